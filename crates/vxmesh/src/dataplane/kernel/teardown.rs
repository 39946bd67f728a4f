//! Teardown: remove everything vxmesh owns in a namespace (`vxmesh down`).

use std::collections::HashMap;

use serde::Serialize;

use super::actual::{Ownership, routes_of};
use super::report::summarise;
use super::{Netlink, NetlinkError, msg};
use crate::model;

/// Teardown could not remove everything: the report says what was removed
/// and lists every failure.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// What vxmesh owns could not be read.
    #[error("{0}")]
    Dump(#[from] NetlinkError),
    #[error("{}", summarise(&report.errors, report.errors.len() + report.routes_deleted + report.links_deleted.len(), "teardown steps", namespace))]
    Incomplete {
        namespace: String,
        report: TeardownReport,
    },
}

impl Netlink {
    /// Delete every managed `vxm-` device (alias `vxmesh:net:`) and every
    /// IPv4 route with protocol 86 (any table). Container veths (alias
    /// `vxmesh:veth:`) and foreign `vxm-` devices are left alone and listed in
    /// `skipped`; ip_forward is left as it is. Keeps going after a failure and
    /// returns an error listing all of them.
    pub async fn teardown(&self) -> Result<TeardownReport, TeardownError> {
        let (rows, routes) = futures::try_join!(
            self.dump_links(),
            self.dump_rows(msg::route_dump(), "routes"),
        )?;
        let names: HashMap<u32, String> = rows.iter().map(|r| (r.index, r.name.clone())).collect();
        let routes = routes_of(&routes, &names);
        let mut rep = TeardownReport::default();
        let reqs = routes
            .iter()
            .map(|r| {
                let req = msg::route_del(&msg::Route {
                    dst: r.dst,
                    via: r.via,
                    oif: r.oif,
                    onlink: false,
                    protocol: Some(model::ROUTE_PROTOCOL),
                    table: r.table,
                    priority: r.priority,
                    tos: r.tos,
                });
                (req, 0, true)
            })
            .collect();
        for (r, res) in routes.iter().zip(self.send_all(reqs).await) {
            match res {
                Ok(()) => rep.routes_deleted += 1,
                Err(e) => rep
                    .errors
                    .push(format!("delete route {} (table {}): {e}", r.dst, r.table)),
            }
        }
        let mut doomed = Vec::new();
        for r in rows
            .iter()
            .filter(|r| r.name.starts_with(model::DEVICE_PREFIX))
        {
            match super::actual::ownership(&r.name, r.alias.as_deref()) {
                Ownership::Managed => doomed.push(r.name.clone()),
                other => rep.skipped.push(format!(
                    "{} ({}, {})",
                    r.name,
                    r.kind.as_deref().unwrap_or("unknown kind"),
                    if other == Ownership::Attached {
                        "container veth"
                    } else {
                        "not created by vxmesh"
                    }
                )),
            }
        }
        let reqs = doomed.iter().map(|n| (msg::link_del(n), 0, true)).collect();
        for (name, res) in doomed.into_iter().zip(self.send_all(reqs).await) {
            match res {
                Ok(()) => rep.links_deleted.push(name),
                Err(e) => rep.errors.push(format!("delete device {name}: {e}")),
            }
        }
        rep.links_deleted.sort();
        if rep.errors.is_empty() {
            Ok(rep)
        } else {
            Err(TeardownError::Incomplete {
                namespace: self.namespace().to_string(),
                report: rep,
            })
        }
    }
}

/// What [`Netlink::teardown`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TeardownReport {
    pub links_deleted: Vec<String>,
    pub routes_deleted: usize,
    /// `vxm-` devices left in place: "name (kind, why)".
    pub skipped: Vec<String>,
    pub errors: Vec<String>,
    /// vxmesh's nftables table (`inet vxmesh`) was deleted (`vxmesh down`).
    pub firewall_table: bool,
}
