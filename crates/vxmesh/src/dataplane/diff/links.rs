//! Devices: every attribute of a planned device compared with the kernel's
//! ([`LinkDrift`]), and the device changes that follow from the drift: a
//! new device for drift in what is set at creation, in-place fixes for the
//! rest.

use std::collections::{HashMap, HashSet};

use crate::dataplane::kernel::{ActualLink, ActualState};
use crate::dataplane::verdict::{Extra, LinkDrift, Verdict, Verdicts};
use crate::dataplane::{LinkKind, LinkSpec, NodePlan};

use super::{Change, LinkFix};

/// The devices this diff creates (nothing on them exists yet) and deletes
/// (everything on them vanishes with them).
pub(super) struct DeviceChanges<'a> {
    pub fresh: HashSet<&'a str>,
    pub gone: HashSet<&'a str>,
}

/// Every attribute of `have` that differs from `want`. With the wrong kind
/// (or no vxlan attributes) the vxlan attributes are not compared.
pub(crate) fn link_drift(want: &LinkSpec, have: &ActualLink) -> Vec<LinkDrift> {
    let mut drift = Vec::new();
    let kind = want.kind.name();
    if have.kind.as_deref() != Some(kind) {
        drift.push(LinkDrift::Kind {
            have: have.kind.clone(),
            want: kind,
        });
    } else if let LinkKind::Vxlan(v) = &want.kind {
        match &have.vxlan {
            None => drift.push(LinkDrift::NoVxlanAttributes),
            Some(a) => {
                if a.vni != v.vni.get() {
                    drift.push(LinkDrift::Vni {
                        have: a.vni,
                        want: v.vni.get(),
                    });
                }
                if a.local != Some(v.local) {
                    drift.push(LinkDrift::Local {
                        have: a.local,
                        want: v.local,
                    });
                }
                if a.port != v.port {
                    drift.push(LinkDrift::Port {
                        have: a.port,
                        want: v.port,
                    });
                }
                let dev_ok = match &v.underlay_dev {
                    Some(d) => a.link.as_deref() == Some(d.as_str()),
                    None => a.link_index.is_none(),
                };
                if !dev_ok {
                    drift.push(LinkDrift::UnderlayDev {
                        have: a.link.clone(),
                        have_index: a.link_index,
                        want: v.underlay_dev.clone(),
                    });
                }
                if a.learning {
                    drift.push(LinkDrift::Learning);
                }
                if a.proxy != v.proxy {
                    drift.push(LinkDrift::Proxy {
                        have: a.proxy,
                        want: v.proxy,
                    });
                }
            }
        }
    }
    if !have.up {
        drift.push(LinkDrift::Down);
    }
    if have.mtu != want.mtu {
        drift.push(LinkDrift::Mtu {
            have: have.mtu,
            want: want.mtu,
        });
    }
    if have.mac != Some(want.mac) {
        drift.push(LinkDrift::Mac {
            have: have.mac,
            want: want.mac,
        });
    }
    if have.master != want.master {
        drift.push(LinkDrift::Master {
            have: have.master.clone(),
            want: want.master.clone(),
        });
    }
    if have.alias.as_deref() != Some(want.alias.as_str()) {
        drift.push(LinkDrift::Alias {
            have: have.alias.clone(),
            want: want.alias.clone(),
        });
    }
    if want.master.is_some() && have.port_learning != Some(want.port_learning) {
        drift.push(LinkDrift::PortLearning {
            have: have.port_learning,
            want: want.port_learning,
        });
    }
    drift
}

/// Judge the planned devices and the managed ones the plan does not list,
/// and push the device changes: deletes and creations in plan order, then
/// in-place fixes and bridge-port learning.
pub(super) fn judge_links<'a>(
    plan: &'a NodePlan,
    actual: &'a ActualState,
    verdicts: &mut Verdicts<'a>,
    out: &mut Vec<Change>,
) -> DeviceChanges<'a> {
    let by_name: HashMap<&str, &ActualLink> =
        actual.links.iter().map(|l| (l.name.as_str(), l)).collect();
    let planned: HashSet<&str> = plan.links.iter().map(|l| l.name.as_str()).collect();
    let mut fresh: HashSet<&str> = HashSet::new();
    let mut gone: HashSet<&str> = HashSet::new();

    for l in &plan.links {
        let verdict = match by_name.get(l.name.as_str()) {
            None => {
                out.push(Change::CreateLink { link: l.clone() });
                fresh.insert(&l.name);
                Verdict::Missing
            }
            Some(a) => {
                let drift = link_drift(l, a);
                let recreate: Vec<String> = drift
                    .iter()
                    .filter(|d| d.needs_recreate())
                    .map(LinkDrift::recreate_reason)
                    .collect();
                if !recreate.is_empty() {
                    out.push(Change::DeleteLink {
                        name: a.name.clone(),
                        kind: a.kind_name().to_string(),
                        reason: recreate.join(", "),
                    });
                    out.push(Change::CreateLink { link: l.clone() });
                    fresh.insert(&l.name);
                    gone.insert(&l.name);
                }
                if drift.is_empty() {
                    Verdict::Ok
                } else {
                    Verdict::Different(drift)
                }
            }
        };
        verdicts.links.push((l, verdict));
    }
    for a in actual.managed_links() {
        if !planned.contains(a.name.as_str()) {
            out.push(Change::DeleteLink {
                name: a.name.clone(),
                kind: a.kind_name().to_string(),
                reason: "not in the plan".into(),
            });
            gone.insert(&a.name);
            verdicts.extra.push(Extra::Device(a));
        }
    }

    for (l, verdict) in &verdicts.links {
        fix_in_place(l, verdict, &fresh, out);
    }
    DeviceChanges { fresh, gone }
}

/// The in-place fixes of an existing device, and bridge-port learning (a
/// new port, or a device enslaved again, starts with learning on).
fn fix_in_place(
    l: &LinkSpec,
    verdict: &Verdict<Vec<LinkDrift>>,
    fresh: &HashSet<&str>,
    out: &mut Vec<Change>,
) {
    let enslaved = l.master.is_some();
    if fresh.contains(l.name.as_str()) {
        if enslaved && !l.port_learning {
            out.push(Change::SetPortLearning {
                dev: l.name.clone(),
                learning: false,
            });
        }
        return;
    }
    let drift = match verdict {
        Verdict::Different(d) => d.as_slice(),
        _ => &[],
    };
    let mut fix = LinkFix::default();
    for d in drift {
        match d {
            LinkDrift::Mtu { want, .. } => fix.mtu = Some(*want),
            LinkDrift::Mac { want, .. } => fix.mac = Some(*want),
            LinkDrift::Master { want, .. } => fix.master = Some(want.clone()),
            LinkDrift::Alias { want, .. } => fix.alias = Some(want.clone()),
            LinkDrift::Down => fix.up = true,
            _ => {}
        }
    }
    // A master created by this diff is a new device: enslave again.
    if l.master.as_deref().is_some_and(|m| fresh.contains(m)) {
        fix.master = Some(l.master.clone());
    }
    let reenslaved = matches!(fix.master, Some(Some(_)));
    if !fix.is_empty() {
        out.push(Change::SetLink {
            name: l.name.clone(),
            fix,
        });
    }
    let learning_drifts = if reenslaved {
        !l.port_learning
    } else {
        drift
            .iter()
            .any(|d| matches!(d, LinkDrift::PortLearning { .. }))
    };
    if enslaved && learning_drifts {
        out.push(Change::SetPortLearning {
            dev: l.name.clone(),
            learning: l.port_learning,
        });
    }
}
