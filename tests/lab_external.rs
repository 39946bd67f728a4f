//! The lab's outside world (`lab up --external`): from every container the
//! outside host answers ICMP and TCP (outbound NAT, in bridged mode through
//! the distributed gateway), the outside host has no way into a container
//! subnet, and every published port answers from outside as its container.
//! Root; namespaces only.

mod common;

use std::time::Duration;

use common::*;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;
use vxmesh_lab::lab::{self, LabSpec};
use vxmesh_lab::probe;

fn external(tag: &str, mode: Mode, publish: Option<(u16, u16)>) -> LabSpec {
    let mut s = spec(tag, 2, 1, mode, 1);
    s.external = true;
    s.publish = publish;
    s
}

async fn outside_world_answers(s: LabSpec) {
    let name = s.name.clone();
    {
        let lab = up(&s).await;
        let report = lab.check_external(Duration::from_secs(2)).unwrap();
        let want = 2 * lab.info.containers.len() + lab.info.published.len();
        assert_eq!(report.probes.len(), want, "{}", report.render());
        assert!(report.failures().is_empty(), "{}", report.render());
        // The outside host has no route to any container.
        let out = Netns::open(&lab::outside_ns(&name)).unwrap();
        for c in &lab.info.containers {
            let r = probe::icmp_echo(&out, c.ip, 56, false, Duration::from_millis(300));
            assert!(
                !matches!(r, Ok(probe::EchoOutcome::Reply { .. })),
                "the outside host reached container {} ({}) directly",
                c.name,
                c.ip
            );
        }
        // CLI: the same check, by name.
        let (code, stdout, stderr) = vxmesh(&["lab", "check", &name, "--external"]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.contains("outside-world probes answered"), "{stdout}");
    }
    assert_all_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_containers_reach_the_outside_world() {
    outside_world_answers(external("exr", Mode::Routed, None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_containers_reach_the_outside_world_through_their_gateway() {
    outside_world_answers(external("exb", Mode::Bridged, None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_ports_answer_from_outside_as_their_container() {
    outside_world_answers(external("exp", Mode::Bridged, Some((8080, 80)))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_without_outside_world_refuses_the_external_check() {
    let s = spec("exn", 1, 1, Mode::Routed, 1);
    let name = s.name.clone();
    {
        let _lab = up(&s).await;
        let (code, _, stderr) = vxmesh(&["lab", "check", &name, "--external"]);
        assert_ne!(code, 0);
        assert!(stderr.contains("--external"), "{stderr}");
    }
    assert_all_gone(&name);
}
