//! What an apply did and what went wrong: [`ApplyReport`] counts the
//! requests sent and lists every failed change as a [`ChangeError`] (the
//! change, and the kernel's errno and message); [`ApplyError`] is the
//! report of an apply that had failures.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::{KernelError, NetlinkError};
use crate::dataplane::diff::{Change, Phase};
use crate::dataplane::netns::NetnsError;
use crate::dataplane::sysctl::SysctlError;

/// What an apply sent. Counts are requests (each answered by the kernel),
/// whether they succeeded or not.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ApplyReport {
    /// Changes asked for.
    pub changes: usize,
    pub links: usize,
    pub addresses: usize,
    pub routes: usize,
    pub neighbours: usize,
    pub fdb: usize,
    /// sysctl writes (not netlink).
    pub sysctl: usize,
    /// Link dumps made to resolve device names to indexes (not counted in
    /// [`ApplyReport::messages`]).
    pub dumps: usize,
    /// One entry per failed change, with the change and the kernel's reason
    /// (serialised as their log lines).
    #[serde(serialize_with = "as_lines")]
    pub errors: Vec<ApplyFailure>,
    /// Time per phase: (phase, changes, duration).
    pub phases: Vec<(Phase, usize, Duration)>,
    pub elapsed: Duration,
}

impl ApplyReport {
    /// This report followed by `then` (a later apply of the same pass).
    pub fn merged(mut self, then: ApplyReport) -> ApplyReport {
        self.changes += then.changes;
        self.links += then.links;
        self.addresses += then.addresses;
        self.routes += then.routes;
        self.neighbours += then.neighbours;
        self.fdb += then.fdb;
        self.sysctl += then.sysctl;
        self.dumps += then.dumps;
        self.errors.extend(then.errors);
        self.phases.extend(then.phases);
        self.elapsed += then.elapsed;
        self
    }
}

fn as_lines<S: Serializer>(errors: &[ApplyFailure], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errors.iter().map(ToString::to_string))
}

/// The kind of object a change touches, for the counts of [`ApplyReport`].
#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    Link,
    Address,
    Route,
    Neighbour,
    Fdb,
    Sysctl,
}

impl Kind {
    pub(super) fn of(c: &Change) -> Kind {
        match c {
            Change::DeleteLink { .. }
            | Change::CreateLink { .. }
            | Change::SetLink { .. }
            | Change::SetPortLearning { .. } => Kind::Link,
            Change::DeleteAddress { .. } | Change::AddAddress { .. } => Kind::Address,
            Change::SetIpForward { .. } => Kind::Sysctl,
            Change::DeleteRoute { .. } | Change::ReplaceRoute { .. } => Kind::Route,
            Change::ReplaceNeighbour { .. } | Change::DeleteNeighbour { .. } => Kind::Neighbour,
            Change::ReplaceFdb { .. } | Change::DeleteFdb { .. } => Kind::Fdb,
        }
    }
}

impl ApplyReport {
    /// Netlink requests sent to change state.
    pub fn messages(&self) -> usize {
        self.links + self.addresses + self.routes + self.neighbours + self.fdb
    }

    pub(super) fn count(&mut self, kind: Kind, n: usize) {
        match kind {
            Kind::Link => self.links += n,
            Kind::Address => self.addresses += n,
            Kind::Route => self.routes += n,
            Kind::Neighbour => self.neighbours += n,
            Kind::Fdb => self.fdb += n,
            Kind::Sysctl => self.sysctl += n,
        }
    }
}

/// Why one change failed. The text is what follows the change in the log
/// line (`"replace fdb ...: No such device (os error 19)"`).
#[derive(Clone, Debug, thiserror::Error)]
pub enum ChangeFailure {
    /// The kernel refused the request.
    #[error("{0}")]
    Kernel(KernelError),
    /// A device the change refers to does not exist.
    #[error("device {0} does not exist")]
    NoDevice(String),
    /// The bridge a new device should be enslaved to does not exist.
    #[error("master: device {0} does not exist")]
    NoMaster(String),
    /// The underlay device of a new VTEP does not exist.
    #[error("underlay: device {0} does not exist")]
    NoUnderlay(String),
    /// The kernel refused a new VTEP as a duplicate with no message of its
    /// own: most likely its VNI and port are taken.
    #[error("{kernel} (another vxlan device may already use VNI {vni} on port {port})")]
    VniInUse {
        kernel: KernelError,
        vni: u32,
        port: u16,
    },
    /// A new device was made but its alias (vxmesh's mark) was refused.
    #[error("set alias: {0}")]
    SetAlias(KernelError),
    /// A new bridge could not be made or set up.
    #[error("{0}")]
    Bridge(Arc<NetlinkError>),
    #[error("{0}")]
    Sysctl(Arc<SysctlError>),
    /// The namespace could not be entered for a sysctl.
    #[error("{0}")]
    Netns(Arc<NetnsError>),
    /// A change that is not one request reached the batch sender.
    #[error("not a single-request change")]
    NotSingleRequest,
}

impl ChangeFailure {
    /// The kernel's answer, when the kernel refused the request.
    pub fn kernel(&self) -> Option<&KernelError> {
        match self {
            ChangeFailure::Kernel(k)
            | ChangeFailure::SetAlias(k)
            | ChangeFailure::VniInUse { kernel: k, .. } => Some(k),
            ChangeFailure::Bridge(e) => match e.as_ref() {
                NetlinkError::Request { kernel, .. } => Some(kernel),
                _ => None,
            },
            _ => None,
        }
    }
}

/// One change that failed: the change (its display is the log line) and why.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{change}: {failure}")]
pub struct ChangeError {
    pub change: Change,
    pub failure: ChangeFailure,
}

impl ChangeError {
    /// The kernel's errno and message, when the kernel refused it.
    pub fn kernel(&self) -> Option<&KernelError> {
        self.failure.kernel()
    }
}

/// One entry of [`ApplyReport::errors`].
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApplyFailure {
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// Device indexes could not be read: the phase's changes were skipped.
    #[error("dump links in {namespace}: {kernel}")]
    ResolveDevices {
        namespace: String,
        kernel: KernelError,
    },
}

impl ApplyFailure {
    /// The change that failed, if the failure belongs to one.
    pub fn change(&self) -> Option<&Change> {
        match self {
            ApplyFailure::Change(e) => Some(&e.change),
            ApplyFailure::ResolveDevices { .. } => None,
        }
    }

    /// The kernel's errno and message, when the kernel refused a request.
    pub fn kernel(&self) -> Option<&KernelError> {
        match self {
            ApplyFailure::Change(e) => e.kernel(),
            ApplyFailure::ResolveDevices { kernel, .. } => Some(kernel),
        }
    }
}

/// "N of TOTAL WHAT failed in NS:" and the first 20 failures, one a line.
pub(super) fn summarise<E: fmt::Display>(
    errors: &[E],
    total: usize,
    what: &str,
    ns: &str,
) -> String {
    const SHOWN: usize = 20;
    let mut s = format!("{} of {total} {what} failed in {ns}:", errors.len());
    for e in errors.iter().take(SHOWN) {
        s.push_str("\n  - ");
        s.push_str(&e.to_string());
    }
    if errors.len() > SHOWN {
        s.push_str(&format!("\n  ... and {} more", errors.len() - SHOWN));
    }
    s
}

/// Some changes failed; the report lists every failure.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}", summarise(&self.report.errors, self.report.changes, "changes", &self.namespace))]
pub struct ApplyError {
    pub namespace: String,
    pub report: ApplyReport,
}
