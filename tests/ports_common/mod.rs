//! What the published-port tests share: a TCP client run inside a lab
//! namespace, and the node's nftables rules as text (inspection only).
#![allow(dead_code)]

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use vxmesh::dataplane::netns::Netns;

/// Connect from namespace `ns` to `ip:port` and read what the server says
/// until it closes (the test servers answer one line and close).
pub fn fetch(ns: &str, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    let netns = Netns::open(ns).map_err(|e| format!("{ns}: {e}"))?;
    netns
        .run(move || -> Result<String, anyhow::Error> {
            let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text.trim().to_string())
        })
        .map_err(|e| format!("{ns} -> {ip}:{port}: {e:#}"))
}

/// Poll [`fetch`] until it answers `want`, up to `timeout`; the last
/// answer or error otherwise.
pub async fn fetch_until(
    ns: &str,
    ip: Ipv4Addr,
    port: u16,
    want: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    let t0 = std::time::Instant::now();
    let mut last;
    loop {
        last = fetch(ns, ip, port);
        if last.as_deref() == Ok(want) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(format!("after {timeout:?}: {last:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `nft list ruleset` in namespace `ns` (for inspection: which rules exist).
pub fn ruleset(ns: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "ruleset"])
        .output()
        .expect("run nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines of `ns`'s ruleset that name port `port` (as a number of its
/// own, whatever the rule's form: `dport 8080`, a map, a set).
pub fn rules_naming_port(ns: &str, port: u16) -> Vec<String> {
    let port = port.to_string();
    ruleset(ns)
        .lines()
        .filter(|l| l.split(|c: char| !c.is_ascii_digit()).any(|t| t == port))
        .map(|l| l.trim().to_string())
        .collect()
}

/// The first container of the lab on `node`.
pub fn first_on(lab: &vxmesh_lab::lab::Lab, node: &str) -> vxmesh_lab::lab::LabContainer {
    lab.info
        .containers
        .iter()
        .find(|c| c.node == node)
        .unwrap_or_else(|| panic!("no container on {node}"))
        .clone()
}
