//! Docker `-p` through the vxmesh plugin, with a private dockerd on every
//! lab host (`lab up --runtime docker`, never the machine's Docker): a port
//! published on host1 answers on host1's underlay address to another lab
//! host, to a container on another node and to a container on host1 itself
//! (hairpin), promptly (the plugin pokes the agent; its resync is a minute
//! here); a second container asking for the same host port fails naming
//! the port and its owner; `docker rm -f` removes the record and the rule.
//! Root; namespaces only.

mod common;
mod ports_common;

use std::time::Duration;

use common::*;
use ports_common::*;
use vxmesh::config::Mode;
use vxmesh_lab::lab::{IMAGE, LabStore, Runtime};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_publish_reaches_from_hosts_containers_and_hairpin() {
    let mut s = spec("dkp", 2, 1, Mode::Routed, 1);
    s.runtime = Runtime::Docker;
    s.store = LabStore::Static;
    // Only a poke can make a port work within seconds.
    s.agent_args = vec!["--resync=60".into()];
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let h2 = lab.node("host2").unwrap().clone();
    let (local, remote) = (first_on(&lab, "host1"), first_on(&lab, "host2"));
    let net = local.network.clone();

    lab.docker(
        "host1",
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--network",
            &net,
            "-p",
            "8080:80",
            IMAGE,
            "nc",
            "-ll",
            "-p",
            "80",
            "-e",
            "/bin/echo",
            "web",
        ],
    )
    .unwrap();
    // From host2 (another lab host), promptly after `docker run` returned.
    let took = fetch_until(
        &h2.netns,
        h1.underlay_ip,
        8080,
        "web",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "host2 -> host1:8080: {e}\nrules: {:?}",
            rules_naming_port(&h1.netns, 8080)
        )
    });
    eprintln!("published port answered {took:?} after docker run returned");
    // From a container on another node, and from one on host1 (hairpin).
    for c in [&remote, &local] {
        let got = fetch_until(
            &c.netns,
            h1.underlay_ip,
            8080,
            "web",
            Duration::from_secs(5),
        )
        .await;
        assert!(got.is_ok(), "{} -> host1:8080: {got:?}", c.name);
    }
    let records = vxmesh::ports::list(&h1.state_dir).unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let endpoint = lab
        .docker(
            "host1",
            &[
                "inspect",
                "-f",
                &format!("{{{{(index .NetworkSettings.Networks \"{net}\").EndpointID}}}}"),
                "web",
            ],
        )
        .unwrap();
    assert_eq!(records[0].owner.container_id, format!("docker:{endpoint}"));

    // The same host port again: a clear error naming port and owner; the
    // first keeps answering, nothing of the second is left.
    let e = lab
        .docker(
            "host1",
            &[
                "run",
                "-d",
                "--name",
                "web2",
                "--network",
                &net,
                "-p",
                "8080:80",
                IMAGE,
                "sleep",
                "600",
            ],
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("host port 8080/tcp on this node is already published by")
            && e.contains(&format!("docker:{endpoint}")),
        "{e}"
    );
    let _ = lab.docker("host1", &["rm", "-f", "web2"]);
    assert_eq!(vxmesh::ports::list(&h1.state_dir).unwrap().len(), 1);
    assert_eq!(fetch(&h2.netns, h1.underlay_ip, 8080).as_deref(), Ok("web"));

    // docker rm -f: the record and the rule go, the port stops answering.
    assert!(!rules_naming_port(&h1.netns, 8080).is_empty());
    lab.docker("host1", &["rm", "-f", "web"]).unwrap();
    assert!(vxmesh::ports::list(&h1.state_dir).unwrap().is_empty());
    let gone = wait_until(Duration::from_secs(10), || {
        rules_naming_port(&h1.netns, 8080).is_empty()
    })
    .await;
    assert!(
        gone.is_some(),
        "rules left: {:?}",
        rules_naming_port(&h1.netns, 8080)
    );
    assert!(fetch(&h2.netns, h1.underlay_ip, 8080).is_err());

    // Unsupported bindings are refused with the fix, and leave nothing.
    for (args, want) in [
        (vec!["-p", "80"], "give the host port, -p HOST:80/tcp"),
        (
            vec!["-p", "192.0.2.9:8081:80"],
            "192.0.2.9 is not an address of this node",
        ),
    ] {
        let mut full = vec!["run", "-d", "--network", net.as_str()];
        full.extend(args.iter().copied());
        full.extend([IMAGE, "sleep", "600"]);
        let e = lab.docker("host1", &full).unwrap_err().to_string();
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(vxmesh::ports::list(&h1.state_dir).unwrap().is_empty());
}
