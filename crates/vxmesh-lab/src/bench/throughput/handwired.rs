//! The reference path of `bench throughput`: the seed's overlay recipe
//! (flannel-style routed, Docker-style bridged; see docs/benchmarks.md)
//! wired by hand with `ip` and `bridge`, in namespaces of its own that the
//! bench creates and removes. vxmesh itself never runs these commands.
//!
//! Topology, a copy of a lab's 2 hosts: an underlay namespace with bridge
//! `br-ul`, two host namespaces (`eth0` at 198.18.0.1/.2 on a /23, MTU 1500,
//! as the lab's), each with one "container" namespace behind `veth0`/`veth1`
//! and a bridge `br0`, and a VTEP `vxlan100` (VNI 100, port 4789,
//! `nolearning`) with static neighbour and FDB entries to the other host.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};
use vxmesh::config::Mode;

use super::Leg;
use crate::lab::{UNDERLAY_PREFIX, host_ip};

/// The containers' MTU: the underlay's 1500 minus VXLAN's 50, as vxmesh
/// sets it. The seed leaves it at 1500, which breaks its bridged variant
/// (frames too big for the VTEP are dropped at the bridge) and makes its
/// routed one rely on path-MTU discovery.
pub const MTU: u32 = 1450;

/// The namespaces of the hand-wired overlay, `vxm-PREFIX-*`.
#[derive(Clone, Debug)]
pub struct Names {
    pub underlay: String,
    pub hosts: [String; 2],
    pub containers: [String; 2],
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        let n = |s: &str| format!("vxm-{prefix}-{s}");
        Names {
            underlay: n("ul"),
            hosts: [n("h1"), n("h2")],
            containers: [n("c1"), n("c2")],
        }
    }

    fn all(&self) -> Vec<&String> {
        std::iter::once(&self.underlay)
            .chain(&self.hosts)
            .chain(&self.containers)
            .collect()
    }
}

/// Host `i`'s (0 or 1) VTEP MAC (routed) and container MAC (bridged):
/// fixed, so the recipe needs no lookups (the seed reads them off the devices).
fn vtep_mac(i: usize) -> String {
    format!("02:76:78:00:00:{:02x}", i + 1)
}

fn container_mac(i: usize) -> String {
    format!("02:76:78:01:00:{:02x}", i + 1)
}

/// Container `i`'s address and prefix: routed, 172.18.10.2/24 and
/// 172.18.20.2/24 behind gateways .1 (the seed's); bridged, one /24 for
/// both (172.18.10.2 and .3), as a vxmesh bridged network has.
pub fn container_ip(mode: Mode, i: usize) -> Ipv4Addr {
    match mode {
        Mode::Routed => Ipv4Addr::new(172, 18, 10 * (i as u8 + 1), 2),
        Mode::Bridged => Ipv4Addr::new(172, 18, 10, 2 + i as u8),
    }
}

fn routed_subnet(i: usize) -> String {
    format!("172.18.{}.0/24", 10 * (i + 1))
}

/// Every command of the recipe, in order (argv, the program first), for the
/// namespaces in `n`. Pure, so it is unit-tested.
pub fn recipe(mode: Mode, n: &Names) -> Vec<Vec<String>> {
    let mut cmds: Vec<Vec<String>> = Vec::new();
    let mut cmd = |prog: &str, ns: &str, args: &str| {
        let mut v = vec![prog.to_string(), "-n".into(), ns.to_string()];
        v.extend(args.split_whitespace().map(String::from));
        cmds.push(v);
    };
    let ul = &n.underlay;
    cmd("ip", ul, "link set lo up");
    cmd("ip", ul, "link add br-ul type bridge");
    cmd("ip", ul, "link set br-ul up");
    for (i, h) in n.hosts.iter().enumerate() {
        let c = &n.containers[i];
        cmd(
            "ip",
            ul,
            &format!("link add p-h{} type veth peer name eth0 netns {h}", i + 1),
        );
        cmd("ip", ul, &format!("link set p-h{} master br-ul up", i + 1));
        cmd("ip", h, "link set lo up");
        cmd("ip", h, "link set eth0 up");
        cmd(
            "ip",
            h,
            &format!("addr add {}/{UNDERLAY_PREFIX} dev eth0", host_ip(i + 1)),
        );
        cmd("ip", c, "link set lo up");
        // The "container": veth0 inside, veth1 on the host's bridge br0.
        let peer_mac = match mode {
            Mode::Routed => String::new(),
            Mode::Bridged => format!(" address {}", container_mac(i)),
        };
        cmd(
            "ip",
            h,
            &format!(
                "link add veth1 mtu {MTU} type veth peer name veth0 mtu {MTU}{peer_mac} netns {c}"
            ),
        );
        cmd("ip", h, "link add br0 type bridge");
        cmd("ip", h, "link set veth1 master br0 up");
        let cip = container_ip(mode, i);
        cmd("ip", c, &format!("addr add {cip}/24 dev veth0"));
        cmd("ip", c, "link set veth0 up");
        cmd("ip", h, "link set br0 up");
        let local = host_ip(i + 1);
        let j = 1 - i;
        let remote = host_ip(j + 1);
        match mode {
            Mode::Routed => {
                let gw = Ipv4Addr::new(172, 18, 10 * (i as u8 + 1), 1);
                cmd("ip", h, &format!("addr add {gw}/24 dev br0"));
                cmd("ip", c, &format!("route add default via {gw} dev veth0"));
                cmd(
                    "ip",
                    h,
                    &format!(
                        "link add vxlan100 address {} type vxlan id 100 local {local} dev eth0 dstport 4789 nolearning",
                        vtep_mac(i)
                    ),
                );
                cmd(
                    "ip",
                    h,
                    &format!("addr add 172.18.{}.0/32 dev vxlan100", 10 * (i + 1)),
                );
                cmd("ip", h, "link set vxlan100 up");
                cmd(
                    "ip",
                    h,
                    &format!("route add {} dev vxlan100", routed_subnet(j)),
                );
                cmd(
                    "ip",
                    h,
                    &format!(
                        "neigh add {} lladdr {} dev vxlan100",
                        container_ip(mode, j),
                        vtep_mac(j)
                    ),
                );
                cmd(
                    "bridge",
                    h,
                    &format!("fdb append {} dev vxlan100 dst {remote}", vtep_mac(j)),
                );
            }
            Mode::Bridged => {
                cmd("ip", c, "route add default dev veth0");
                cmd(
                    "ip",
                    h,
                    &format!(
                        "link add vxlan100 type vxlan id 100 local {local} dev eth0 dstport 4789 nolearning proxy"
                    ),
                );
                cmd("ip", h, "link set vxlan100 master br0 up");
                cmd(
                    "ip",
                    h,
                    &format!(
                        "neigh add {} lladdr {} dev vxlan100",
                        container_ip(mode, j),
                        container_mac(j)
                    ),
                );
                cmd(
                    "bridge",
                    h,
                    &format!("fdb append {} dev vxlan100 dst {remote}", container_mac(j)),
                );
            }
        }
    }
    // The seed's first step (order does not matter): let the hosts forward
    // (the routed variant needs it).
    for h in &n.hosts {
        cmds.push(
            [
                "ip",
                "netns",
                "exec",
                h,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.forwarding=1",
            ]
            .map(String::from)
            .to_vec(),
        );
    }
    cmds
}

/// The hand-wired overlay, built; dropping it deletes its namespaces (and
/// with them every device the recipe made).
pub struct HandWired {
    pub names: Names,
    pub mode: Mode,
    created: Vec<String>,
}

impl HandWired {
    pub fn build(mode: Mode, prefix: &str) -> Result<HandWired> {
        let names = Names::new(prefix);
        let mut hw = HandWired {
            names: names.clone(),
            mode,
            created: Vec::new(),
        };
        for ns in names.all() {
            run(&["ip", "netns", "add", ns.as_str()])?;
            hw.created.push(ns.clone());
        }
        for argv in recipe(mode, &names) {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            run(&argv).context("hand-wired overlay (seed recipe)")?;
        }
        Ok(hw)
    }

    /// Container 1 to container 2 across the hand-wired overlay.
    pub fn leg(&self) -> Leg {
        Leg {
            client_ns: self.names.containers[0].clone(),
            server_ns: self.names.containers[1].clone(),
            server_ip: container_ip(self.mode, 1),
            agents: Vec::new(),
        }
    }

    /// The VTEP as the kernel has it (`ip -d link show vxlan100` of host 1),
    /// for comparing its settings with vxmesh's.
    pub fn describe_vtep(&self) -> String {
        Command::new("ip")
            .args(["-n", &self.names.hosts[0], "-d", "link", "show", "vxlan100"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for HandWired {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                tracing::warn!("remove hand-wired namespace {ns}: {e:#}");
            }
        }
    }
}

fn run(argv: &[&str]) -> Result<()> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("run {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(mode: Mode) -> Vec<String> {
        recipe(mode, &Names::new("bh1"))
            .iter()
            .map(|c| c.join(" "))
            .collect()
    }

    #[test]
    fn routed_recipe_is_the_seeds_flannel_variant() {
        let l = lines(Mode::Routed);
        for want in [
            "ip -n vxm-bh1-ul link add p-h1 type veth peer name eth0 netns vxm-bh1-h1",
            "ip -n vxm-bh1-h1 addr add 198.18.0.1/23 dev eth0",
            "ip -n vxm-bh1-h1 link add veth1 mtu 1450 type veth peer name veth0 mtu 1450 netns vxm-bh1-c1",
            "ip -n vxm-bh1-h1 link add vxlan100 address 02:76:78:00:00:01 type vxlan id 100 local 198.18.0.1 dev eth0 dstport 4789 nolearning",
            "ip -n vxm-bh1-h1 addr add 172.18.10.0/32 dev vxlan100",
            "ip -n vxm-bh1-h1 route add 172.18.20.0/24 dev vxlan100",
            "ip -n vxm-bh1-h1 neigh add 172.18.20.2 lladdr 02:76:78:00:00:02 dev vxlan100",
            "bridge -n vxm-bh1-h1 fdb append 02:76:78:00:00:02 dev vxlan100 dst 198.18.0.2",
            "ip -n vxm-bh1-c2 route add default via 172.18.20.1 dev veth0",
            "bridge -n vxm-bh1-h2 fdb append 02:76:78:00:00:01 dev vxlan100 dst 198.18.0.1",
            "ip netns exec vxm-bh1-h2 sysctl -qw net.ipv4.conf.all.forwarding=1",
        ] {
            assert!(l.iter().any(|x| x == want), "missing `{want}` in {l:#?}");
        }
        // Routed: the VTEP is not a bridge port.
        assert!(!l.iter().any(|x| x.contains("vxlan100 master")));
        // Every command runs in one of the recipe's own namespaces.
        for c in recipe(Mode::Routed, &Names::new("bh1")) {
            let ns = if c[1] == "-n" { &c[2] } else { &c[3] };
            assert!(ns.starts_with("vxm-bh1-"), "{c:?}");
        }
        // The neighbour comes after its device, the FDB entry after both.
        let pos = |s: &str| l.iter().position(|x| x.contains(s)).unwrap();
        assert!(pos("link add vxlan100") < pos("neigh add 172.18.20.2"));
        assert!(pos("neigh add 172.18.20.2") < pos("fdb append 02:76:78:00:00:02"));
    }

    #[test]
    fn bridged_recipe_is_the_seeds_docker_variant() {
        let l = lines(Mode::Bridged);
        for want in [
            "ip -n vxm-bh1-h1 link add veth1 mtu 1450 type veth peer name veth0 mtu 1450 address 02:76:78:01:00:01 netns vxm-bh1-c1",
            "ip -n vxm-bh1-h1 link add vxlan100 type vxlan id 100 local 198.18.0.1 dev eth0 dstport 4789 nolearning proxy",
            "ip -n vxm-bh1-h1 link set vxlan100 master br0 up",
            "ip -n vxm-bh1-h1 neigh add 172.18.10.3 lladdr 02:76:78:01:00:02 dev vxlan100",
            "bridge -n vxm-bh1-h1 fdb append 02:76:78:01:00:02 dev vxlan100 dst 198.18.0.2",
            "ip -n vxm-bh1-c2 addr add 172.18.10.3/24 dev veth0",
        ] {
            assert!(l.iter().any(|x| x == want), "missing `{want}` in {l:#?}");
        }
        // Bridged: no routes to other subnets, no address on the VTEP.
        assert!(
            !l.iter()
                .any(|x| x.contains("dev vxlan100") && x.contains("route"))
        );
        assert!(
            !l.iter()
                .any(|x| x.contains("addr add") && x.contains("vxlan100"))
        );
        assert_eq!(
            container_ip(Mode::Bridged, 1),
            Ipv4Addr::new(172, 18, 10, 3)
        );
    }
}
