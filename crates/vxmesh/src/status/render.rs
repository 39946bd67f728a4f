//! The human rendering of a status report (`vxmesh status` without --json).

use super::report::{Check, EntryStatus, StatusReport, opt};

fn mark(c: Check) -> &'static str {
    match c {
        Check::Ok => "ok",
        Check::Missing => "MISSING",
        Check::Different => "DIFFERENT",
    }
}

fn entry_line(e: &EntryStatus) -> String {
    let mut s = format!("{:9} {:9} {}", mark(e.state), e.kind, e.want);
    if let Some(a) = &e.actual {
        s.push_str(&format!("  (kernel: {a})"));
    }
    s
}

/// Human-readable rendering.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "node {}: plan applied {} s ago, agent {}, {}",
        r.node,
        r.plan_age_secs,
        if r.agent_running {
            "running"
        } else {
            "NOT running"
        },
        if r.ok { "all in place" } else { "DRIFT" }
    ));
    if let Some(f) = &r.ip_forward {
        line(format!("  {}", entry_line(f)));
    }
    line("devices:".into());
    for d in &r.devices {
        line(format!(
            "  {:9} {:6} {:14} {} mtu {} {}",
            mark(d.state),
            d.kind,
            d.name,
            match d.up {
                Some(true) => "up",
                Some(false) => "down",
                None => "absent",
            },
            d.mtu.map_or("-".into(), |m| m.to_string()),
            d.drift.join("; ")
        ));
        for a in &d.addresses {
            line(format!("    {}", entry_line(a)));
        }
    }
    for n in &r.networks {
        line(format!(
            "network {} ({}, vni {}, {}): subnet {} pool {} gateway {} vtep {} bridge {} mtu {}",
            n.name,
            n.mode,
            n.vni.get(),
            if n.encrypt { "encrypted" } else { "plain" },
            n.subnet,
            n.pool,
            opt(&n.gateway),
            n.vtep,
            n.bridge,
            n.mtu
        ));
        for p in &n.peers {
            line(format!(
                "  peer {} underlay {} mac {} {}: {}",
                p.node.as_deref().unwrap_or("?"),
                p.underlay_ip,
                p.mac,
                p.ips
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                if p.ok { "ok" } else { "NOT OK" }
            ));
            for e in &p.entries {
                line(format!("    {}", entry_line(e)));
            }
        }
    }
    if let Some(s) = &r.secure {
        for l in super::secure::render(s) {
            line(l);
        }
    }
    if let Some(f) = &r.firewall {
        for l in super::firewall::render(f) {
            line(l);
        }
    }
    if !r.extra.is_empty() {
        line("not in the plan (the reconciler removes them):".into());
        for e in &r.extra {
            line(format!("  {:9} {:9} {}", "EXTRA", e.kind, e.actual));
        }
    }
    if !r.pending_changes.is_empty() {
        line(format!(
            "the reconciler would make {} change(s):",
            r.pending_changes.len()
        ));
        for c in &r.pending_changes {
            line(format!("  {c}"));
        }
    }
    out
}
