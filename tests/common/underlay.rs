//! A namespace plugged into a lab's underlay bridge that is no lab host:
//! the attacker of the injection test, the outside host of the NAT tests.

use std::process::Command;

use vxmesh::dataplane::netns::NetnsGuard;

/// `ip ARGS`, which must succeed.
pub fn ip_ok(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace `name` with eth0 = `addr`/24 on the lab's underlay bridge
/// `br-ul` (in `underlay_ns`). Removed with the guard.
pub fn stranger(underlay_ns: &str, name: &str, addr: &str) -> NetnsGuard {
    let guard = NetnsGuard::create(name).expect("create namespace");
    let port = format!("p-{}", &name[name.len().saturating_sub(10)..]);
    ip_ok(&[
        "-n",
        underlay_ns,
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        name,
    ]);
    ip_ok(&[
        "-n",
        underlay_ns,
        "link",
        "set",
        &port,
        "master",
        "br-ul",
        "up",
    ]);
    ip_ok(&[
        "-n",
        name,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ]);
    ip_ok(&["-n", name, "link", "set", "eth0", "up"]);
    ip_ok(&["-n", name, "link", "set", "lo", "up"]);
    guard
}
