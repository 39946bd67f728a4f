//! `vxmesh attach --publish HOST:CONTAINER[/PROTO]` in a lab (namespace
//! containers): the port answers on the node's underlay address to another
//! lab host, a container on another node and one on the same node
//! (hairpin); a second attach asking for the same host port fails naming
//! port and owner and leaves nothing attached; `vxmesh detach` removes the
//! record and the rule; a publish with no kernel change is applied at
//! once (the poke). Root; namespaces only.

mod common;
mod ports_common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ports_common::*;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::{Netns, NetnsGuard};
use vxmesh::ipam::Ipam;

/// A server in a namespace, killed (by its own pid) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vxmesh ARGS` run inside namespace `ns` (as a runtime on that node would).
fn vxmesh_in(ns: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(exe());
    cmd.args(args);
    // The namespace stays open until the child has entered it.
    let netns = Netns::open(ns).unwrap();
    netns.enter_on_exec(&mut cmd);
    let out = cmd.output().unwrap();
    drop(netns);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_publish_reaches_and_detach_removes() {
    let mut s = spec("pub", 2, 1, Mode::Routed, 1);
    s.agent_args = vec!["--resync=60".into()];
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let h2 = lab.node("host2").unwrap().clone();
    let (local, remote) = (first_on(&lab, "host1"), first_on(&lab, "host2"));
    let net = local.network.clone();
    let state = h1.state_dir.display().to_string();
    let web = NetnsGuard::create(&format!("vxm-{}-web", lab.info.name)).unwrap();
    let (ok, out) = vxmesh_in(
        &h1.netns,
        &[
            "attach",
            "--network",
            &net,
            "--container-netns",
            &web.name,
            "--id",
            "web",
            "--publish",
            "9090:90",
            "--publish",
            "9091:91/udp",
            "--state-dir",
            &state,
        ],
    );
    assert!(ok, "{out}");
    let _server = Server(
        Command::new("ip")
            .args([
                "netns", "exec", &web.name, "busybox", "nc", "-ll", "-p", "90",
            ])
            .args(["-e", "/bin/echo", "web"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let records = vxmesh::ports::list(&h1.state_dir).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].ports.len(), 2, "{records:?}");
    for ns in [&h2.netns, &remote.netns, &local.netns] {
        let got = fetch_until(ns, h1.underlay_ip, 9090, "web", Duration::from_secs(10)).await;
        assert!(
            got.is_ok(),
            "{ns} -> host1:9090: {got:?}\nrules: {:?}",
            rules_naming_port(&h1.netns, 9090)
        );
    }

    // A second container asking for 9090: refused, nothing half-applied.
    let other = NetnsGuard::create(&format!("vxm-{}-web2", lab.info.name)).unwrap();
    let (ok, out) = vxmesh_in(
        &h1.netns,
        &[
            "attach",
            "--network",
            &net,
            "--container-netns",
            &other.name,
            "--id",
            "web2",
            "--publish",
            "9090:90",
            "--state-dir",
            &state,
        ],
    );
    assert!(!ok);
    assert!(
        out.contains("host port 9090/tcp on this node is already published by web"),
        "{out}"
    );
    assert!(ip(&other.name, &["link", "show", "eth0"]).is_empty());
    let held: Vec<_> = Ipam::new(&h1.state_dir, &net).list().unwrap();
    assert!(
        held.iter().all(|a| a.owner.container_id != "web2"),
        "{held:?}"
    );
    let (ok, out) = vxmesh_in(
        &h1.netns,
        &[
            "attach",
            "--network",
            &net,
            "--container-netns",
            &other.name,
            "--publish",
            "9092",
            "--state-dir",
            &state,
        ],
    );
    assert!(!ok && out.contains("'9092' is not a port mapping"), "{out}");

    // detach: the record and the rule go, the port stops answering.
    assert!(!rules_naming_port(&h1.netns, 9090).is_empty());
    let (ok, out) = vxmesh_in(
        &h1.netns,
        &[
            "detach",
            "--network",
            &net,
            "--id",
            "web",
            "--state-dir",
            &state,
        ],
    );
    assert!(ok, "{out}");
    assert!(vxmesh::ports::list(&h1.state_dir).unwrap().is_empty());
    let gone = wait_until(Duration::from_secs(10), || {
        rules_naming_port(&h1.netns, 9090).is_empty()
    })
    .await;
    assert!(gone.is_some(), "{:?}", rules_naming_port(&h1.netns, 9090));
    assert!(fetch(&h2.netns, h1.underlay_ip, 9090).is_err());
}

/// A port published for a container already attached changes nothing in
/// the kernel that the agent watches: only the publisher's poke (the
/// agent's resync is a minute here) makes it work within seconds, and the
/// same for unpublishing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poke_applies_a_publish_without_waiting_for_resync() {
    let mut s = spec("poke", 2, 1, Mode::Routed, 1);
    s.agent_args = vec!["--resync=60".into()];
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let h2 = lab.node("host2").unwrap().clone();
    let c = lab
        .info
        .containers
        .iter()
        .find(|c| c.node == "host1")
        .unwrap()
        .clone();
    let _server = Server(
        Command::new("ip")
            .args([
                "netns", "exec", &c.netns, "busybox", "nc", "-ll", "-p", "93",
            ])
            .args(["-e", "/bin/echo", "poked"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Let the agent settle (no pass pending), then publish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let owner = vxmesh::ipam::Owner {
        container_id: c.name.clone(),
        ifname: "eth0".into(),
    };
    let req = vxmesh::ports::PortRequest::single(vxmesh::dataplane::PortProto::Tcp, 9093, 93);
    vxmesh::ports::publish(&h1.state_dir, &c.network, &owner, c.ip, &[req]).unwrap();
    let got = fetch_until(
        &h2.netns,
        h1.underlay_ip,
        9093,
        "poked",
        Duration::from_secs(10),
    )
    .await;
    assert!(got.is_ok(), "{got:?}");
    eprintln!("answered {:?} after publish returned", got.unwrap());
    assert!(vxmesh::ports::unpublish(&h1.state_dir, &c.network, &owner).unwrap());
    let gone = wait_until(Duration::from_secs(10), || {
        rules_naming_port(&h1.netns, 9093).is_empty()
    })
    .await;
    assert!(gone.is_some(), "{:?}", rules_naming_port(&h1.netns, 9093));
}
