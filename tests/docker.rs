//! The Docker network and IPAM plugin with a real dockerd on every lab host
//! (`lab up --runtime docker`): containers on two hosts reach each other in
//! both modes, on the static file and on etcd; Docker and attach/CNI
//! containers share one allocator; the plugin and dockerd restart under
//! running containers without leaking; `docker rm -f` and `docker network
//! rm` release everything; bad options are refused and change nothing.
//! Root; namespaces only; each lab's dockerds are its own (never the
//! machine's Docker).

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use vxmesh::config::Mode;
use vxmesh::dataplane::kernel::Netlink;
use vxmesh::dataplane::netns::{self, Netns};
use vxmesh::ipam::{Allocation, Ipam};
use vxmesh_lab::lab::{Lab, LabSpec, LabStore, Runtime, plugin_name};

fn docker_spec(tag: &str, mode: Mode, store: LabStore, containers: usize) -> LabSpec {
    let mut s = spec(tag, 2, containers, mode, 1);
    s.runtime = Runtime::Docker;
    s.store = store;
    s
}

fn all_pairs_ok(lab: &Lab) {
    let report = lab.check(Duration::from_secs(2)).expect("check");
    assert!(
        report.failures().is_empty(),
        "lab {}:\n{}",
        lab.info.name,
        report.matrix()
    );
}

fn allocations(lab: &Lab, node: &str, net: &str) -> Vec<Allocation> {
    Ipam::new(&lab.node(node).unwrap().state_dir, net)
        .list()
        .unwrap()
}

/// Host veths on `node` whose attachment alias names a Docker endpoint.
async fn docker_veths(lab: &Lab, node: &str) -> usize {
    let nl = Netlink::connect_in(&Netns::open(&lab.node(node).unwrap().netns).unwrap())
        .await
        .unwrap();
    nl.list_links()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| {
            l.alias
                .as_deref()
                .is_some_and(|a| a.starts_with("vxmesh:veth:") && a.contains(":docker:"))
        })
        .count()
}

fn running(lab: &Lab, node: &str) -> BTreeSet<String> {
    lab.docker(node, &["ps", "-q", "--no-trunc"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every Docker-held address on `node` belongs to one endpoint, as many as
/// running containers, each with one veth.
async fn nothing_leaked(lab: &Lab, node: &str, net: &str) {
    let held: Vec<_> = allocations(lab, node, net)
        .into_iter()
        .filter(|a| a.owner.container_id.starts_with("docker:"))
        .collect();
    let n = running(lab, node).len();
    assert_eq!(
        held.len(),
        n,
        "{node}: Docker allocations {held:?} for {n} containers"
    );
    assert!(
        held.iter()
            .all(|a| !a.owner.container_id.starts_with("docker:pending:")),
        "{held:?}"
    );
    assert_eq!(docker_veths(lab, node).await, n, "{node}: veths");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_static_shares_the_allocator_and_survives_restarts() {
    let mut lab = up(&docker_spec("dkr", Mode::Routed, LabStore::Static, 1)).await;
    all_pairs_ok(&lab);

    // A container attached by the CNI plugin (the vxmesh binary run as a
    // runtime runs it, in host1's namespace) and a Docker container after
    // it never share an address.
    let h1 = lab.node("host1").unwrap().clone();
    let cni_ns = format!("vxm-{}-cni", lab.info.name);
    let cns = netns::create(&cni_ns).unwrap();
    let cni_ip = cni(&h1.netns, &h1.state_dir, "ADD", &cni_ns);
    let c2 = lab
        .add_container("host1", "demo", "host1-c2", None)
        .await
        .unwrap();
    let ips: BTreeSet<Ipv4Addr> = lab
        .info
        .containers
        .iter()
        .filter(|c| c.node == "host1")
        .map(|c| c.ip)
        .chain([cni_ip])
        .collect();
    assert_eq!(ips.len(), 3, "{ips:?}");
    assert_eq!(allocations(&lab, "host1", "demo").len(), 3);
    // Docker refuses the CNI container's address, clearly.
    let e = lab
        .docker(
            "host1",
            &[
                "run",
                "-d",
                "--network",
                "demo",
                "--ip",
                &cni_ip.to_string(),
                "vxm-busybox:latest",
                "sleep",
                "9",
            ],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains(&cni_ip.to_string()), "{e}");
    all_pairs_ok(&lab);

    // Bad options: clear errors, nothing changes.
    let plugin = plugin_name(&lab.info.name);
    let nets_dir = h1.state_dir.join("docker/networks");
    let before = std::fs::read_dir(&nets_dir).unwrap().count();
    for (args, want) in [
        (
            vec![
                "-o",
                "vxmesh.network=nope",
                "--ipam-opt",
                "vxmesh.network=nope",
                "--subnet",
                "10.1.0.0/24",
            ],
            "'nope' is not served",
        ),
        (
            vec![
                "--ipam-opt",
                "vxmesh.network=demo",
                "--subnet",
                "10.99.0.0/24",
            ],
            "contradicts vxmesh network 'demo'",
        ),
        (
            vec!["--ipam-opt", "vxmesh.network=demo"],
            "--subnet 172.18.10.0/24",
        ),
        (
            vec!["-o", "colour=red", "--subnet", "172.18.10.0/24"],
            "unknown option colour",
        ),
    ] {
        let mut full = vec!["network", "create", "-d", &plugin, "--ipam-driver", &plugin];
        full.extend(args.iter().copied());
        full.push("bad");
        let e = lab.docker("host1", &full).unwrap_err().to_string();
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(lab.docker("host1", &["network", "inspect", "bad"]).is_err());
    assert_eq!(std::fs::read_dir(&nets_dir).unwrap().count(), before);
    assert_eq!(allocations(&lab, "host1", "demo").len(), 3);

    // The plugin restarts under running containers; what it serves next
    // comes from disk.
    lab.stop_plugin("host1", Signal::SIGKILL).unwrap();
    lab.start_plugin("host1").unwrap();
    lab.remove_container("host1-c2").await.unwrap();
    assert_eq!(
        allocations(&lab, "host1", "demo").len(),
        2,
        "rm -f after a plugin restart"
    );
    let c3 = lab
        .add_container("host1", "demo", "host1-c3", None)
        .await
        .unwrap();
    assert_eq!(c3.ip, c2.ip, "the released address is handed out again");
    nothing_leaked(&lab, "host1", "demo").await;

    // dockerd restarts with running containers (restart policy always):
    // they come back with their addresses, nothing leaks.
    let before: BTreeSet<Ipv4Addr> = allocations(&lab, "host1", "demo")
        .iter()
        .map(|a| a.ip)
        .collect();
    lab.stop_dockerd("host1", Signal::SIGTERM).unwrap();
    lab.start_dockerd("host1").unwrap();
    lab.wait_dockerd("host1", Duration::from_secs(60))
        .await
        .unwrap();
    let back = wait_until(Duration::from_secs(30), || {
        running(&lab, "host1").len() == 2
    })
    .await;
    assert!(
        back.is_some(),
        "containers restarted: {:?}",
        running(&lab, "host1")
    );
    nothing_leaked(&lab, "host1", "demo").await;
    let after: BTreeSet<Ipv4Addr> = allocations(&lab, "host1", "demo")
        .iter()
        .map(|a| a.ip)
        .collect();
    assert_eq!(after.len(), before.len(), "{before:?} -> {after:?}");
    for c in lab
        .info
        .containers
        .clone()
        .iter()
        .filter(|c| c.node == "host1")
    {
        lab.bind_container_netns("host1", &c.name, &c.netns)
            .unwrap();
    }
    let lab_name = lab.info.name.clone();
    for c in lab.info.containers.iter_mut().filter(|c| c.node == "host1") {
        c.ip = lab_ip(&lab_docker_ip(&h1.name, &c.name, &lab_name));
    }
    all_pairs_ok(&lab);

    // docker rm -f and docker network rm release everything.
    for c in lab
        .info
        .containers
        .clone()
        .iter()
        .filter(|c| c.node == "host2")
    {
        lab.remove_container(&c.name).await.unwrap();
    }
    lab.docker("host2", &["network", "rm", "demo"]).unwrap();
    let h2 = lab.node("host2").unwrap().clone();
    assert!(allocations(&lab, "host2", "demo").is_empty());
    assert_eq!(
        std::fs::read_dir(h2.state_dir.join("docker/networks"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(docker_veths(&lab, "host2").await, 0);
    cni(&h1.netns, &h1.state_dir, "DEL", &cni_ns);
    assert!(
        allocations(&lab, "host1", "demo")
            .iter()
            .all(|a| a.ip != cni_ip)
    );
    drop(cns);
}

/// Run the vxmesh binary as a CNI plugin (`command` for container
/// `podman-like`) in the host namespace `host_ns`; ADD returns the address.
fn cni(host_ns: &str, state_dir: &Path, command: &str, cns: &str) -> Ipv4Addr {
    use std::io::Write;
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "vxmesh-net", "type": "vxmesh",
        "network": "demo", "stateDir": state_dir,
    });
    let netns_path = format!("{}/{cns}", netns::NETNS_DIR);
    let env = vxmesh::cni::Env::for_container(command, "podman-like", &netns_path, "eth0");
    let mut cmd = std::process::Command::new(exe());
    cmd.envs(env.to_vars())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    // The namespace stays open until the plugin has started in it.
    let ns = Netns::open(host_ns).unwrap();
    ns.enter_on_exec(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(ns);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "CNI {command}: {text}");
    if command != "ADD" {
        return Ipv4Addr::UNSPECIFIED;
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let addr = v["ips"][0]["address"].as_str().unwrap();
    addr.split('/').next().unwrap().parse().unwrap()
}

/// The address Docker reports for a lab container (after a restart).
fn lab_docker_ip(node: &str, cname: &str, lab: &str) -> String {
    let sock = Path::new(vxmesh_lab::lab::LAB_ROOT)
        .join(lab)
        .join(node)
        .join("docker/docker.sock");
    let out = std::process::Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", sock.display()))
        .args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            cname,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn lab_ip(s: &str) -> Ipv4Addr {
    s.parse()
        .unwrap_or_else(|_| panic!("not an address: {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_etcd_moves_a_container_between_hosts_keeping_its_address() {
    let mut lab = up(&docker_spec("dkb", Mode::Bridged, LabStore::Etcd, 2)).await;
    all_pairs_ok(&lab);
    let c = lab
        .info
        .containers
        .iter()
        .find(|c| c.node == "host1")
        .unwrap()
        .clone();
    let moved = lab.move_container(&c.name, "host2").await.unwrap();
    assert_eq!((moved.ip, moved.node.as_str()), (c.ip, "host2"));
    all_pairs_ok(&lab);
    nothing_leaked(&lab, "host1", "net1").await;
    nothing_leaked(&lab, "host2", "net1").await;
    // Network-wide: the address is host2's now, and host1 cannot take it.
    let e = lab
        .docker(
            "host1",
            &[
                "run",
                "-d",
                "--network",
                "net1",
                "--ip",
                &c.ip.to_string(),
                "vxm-busybox:latest",
                "sleep",
                "9",
            ],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains(&c.ip.to_string()), "{e}");
    nothing_leaked(&lab, "host1", "net1").await;
    // All of host2's containers removed at once: dockerd releases their
    // addresses concurrently, and the plugin answers every release (it
    // used to deadlock on its allocator lock: the client then timed out).
    let ids = lab.docker("host2", &["ps", "-aq"]).unwrap();
    assert!(ids.lines().count() >= 2, "{ids}");
    let mut rm = vec!["rm", "-f"];
    rm.extend(ids.lines());
    lab.docker("host2", &rm).unwrap();
    assert_eq!(lab.docker("host2", &["ps", "-aq"]).unwrap(), "");
    nothing_leaked(&lab, "host2", "net1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_static_and_routed_etcd_reach_across_hosts() {
    for (mode, store) in [
        (Mode::Bridged, LabStore::Static),
        (Mode::Routed, LabStore::Etcd),
    ] {
        let lab = up(&docker_spec("dkx", mode, store, 1)).await;
        all_pairs_ok(&lab);
        for n in ["host1", "host2"] {
            nothing_leaked(&lab, n, &lab.info.containers[0].network.clone()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_down_leaves_nothing_behind() {
    let (name, dir) = {
        let lab = up(&docker_spec("dkd", Mode::Routed, LabStore::Static, 1)).await;
        (lab.info.name.clone(), lab.info.dir.clone())
    };
    let dir_text = format!("{}/", dir.display());
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        assert!(!cmd.contains(&dir_text), "left running: {cmd}");
    }
    assert!(!dir.exists());
    assert!(!Path::new(&format!("/etc/docker/plugins/{}.spec", plugin_name(&name))).exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir_text), "mounts left");
    assert!(netns::list(&format!("vxm-{name}-")).is_empty());
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for n in ["host1", "host2"] {
            let cg = h.path().join(format!("vxm-{name}-{n}"));
            assert!(!cg.exists(), "cgroup left: {}", cg.display());
        }
    }
}
