//! The records: publishing, replacing, conflicts, ranges, pruning, parsing.

use super::*;

fn owner(id: &str) -> Owner {
    Owner {
        container_id: id.into(),
        ifname: "eth0".into(),
    }
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 10, last)
}

fn tcp(host: u16, container: u16) -> PortRequest {
    PortRequest::single(PortProto::Tcp, host, container)
}

#[test]
fn mappings_parse_with_tcp_as_the_default() {
    assert_eq!("8080:80".parse::<PortRequest>().unwrap(), tcp(8080, 80));
    assert_eq!("8080:80/tcp".parse::<PortRequest>().unwrap(), tcp(8080, 80));
    assert_eq!(
        "53:5353/udp".parse::<PortRequest>().unwrap(),
        PortRequest::single(PortProto::Udp, 53, 5353)
    );
    for (bad, why) in [
        ("8080", "no ':'"),
        ("8080:80/sctp", "neither tcp nor udp"),
        ("0:80", "host port '0'"),
        ("8080:70000", "container port '70000'"),
        (":80", "host port ''"),
        ("a:b", "host port 'a'"),
    ] {
        let e = bad.parse::<PortRequest>().unwrap_err().to_string();
        assert!(
            e.contains(why) && e.contains("HOST:CONTAINER"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn publish_replace_unpublish() {
    let d = tempfile::tempdir().unwrap();
    let ports = Ports::new(d.path());
    let got = ports
        .publish(
            "demo",
            &owner("c1"),
            ip(2),
            &[tcp(8080, 80), tcp(8443, 443)],
        )
        .unwrap();
    assert_eq!(got.len(), 2);
    // Publishing again replaces the owner's set (no conflict with itself).
    ports
        .publish("demo", &owner("c1"), ip(2), &[tcp(8080, 8000)])
        .unwrap();
    let all = ports.list().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        all[0].ports,
        vec![Published {
            proto: PortProto::Tcp,
            host_port: 8080,
            container_port: 8000
        }]
    );
    let specs: Vec<PortSpec> = all[0].specs().collect();
    assert_eq!(
        specs,
        vec![PortSpec {
            proto: PortProto::Tcp,
            host_port: 8080,
            container_ip: ip(2),
            container_port: 8000,
            network: "demo".into(),
            owner: "c1".into(),
        }]
    );
    assert!(ports.unpublish("demo", &owner("c1")).unwrap());
    assert!(!ports.unpublish("demo", &owner("c1")).unwrap());
    assert!(ports.list().unwrap().is_empty());
}

#[test]
fn a_taken_host_port_names_the_port_protocol_and_owner() {
    let d = tempfile::tempdir().unwrap();
    let ports = Ports::new(d.path());
    ports
        .publish("demo", &owner("docker:ep1"), ip(2), &[tcp(8080, 80)])
        .unwrap();
    // Another network on the same node: the host port is the node's.
    let e = ports
        .publish(
            "other",
            &owner("c2"),
            ip(3),
            &[tcp(9000, 90), tcp(8080, 80)],
        )
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "host port 8080/tcp on this node is already published by docker:ep1 (network demo, to 172.18.10.2:80): unpublish it first (`docker rm -f` its container, `vxmesh detach`), or choose another host port"
    );
    assert_eq!(ports.list().unwrap().len(), 1, "nothing half-applied");
    // The same number over udp is another port.
    ports
        .publish(
            "other",
            &owner("c2"),
            ip(3),
            &[PortRequest::single(PortProto::Udp, 8080, 80)],
        )
        .unwrap();
    let e = ports
        .publish("demo", &owner("c3"), ip(4), &[tcp(7000, 1), tcp(7000, 2)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("7000/tcp is asked for twice for c3"), "{e}");
}

#[test]
fn a_range_takes_its_first_free_port() {
    let d = tempfile::tempdir().unwrap();
    let ports = Ports::new(d.path());
    ports
        .publish("demo", &owner("a"), ip(2), &[tcp(8080, 80)])
        .unwrap();
    let range = PortRequest {
        proto: PortProto::Tcp,
        host_first: 8080,
        host_last: 8081,
        container_port: 80,
    };
    let got = ports.publish("demo", &owner("b"), ip(3), &[range]).unwrap();
    assert_eq!(got[0].host_port, 8081);
    let e = ports
        .publish("demo", &owner("c"), ip(4), &[range])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("every host port of 8080-8081/tcp") && e.contains("a, b"),
        "{e}"
    );
}

#[test]
fn records_of_gone_veths_are_dropped_and_planned_by_network() {
    let d = tempfile::tempdir().unwrap();
    let ports = Ports::new(d.path());
    ports
        .publish("demo", &owner("a"), ip(2), &[tcp(8080, 80)])
        .unwrap();
    ports
        .publish("gone", &owner("b"), ip(3), &[tcp(8081, 80)])
        .unwrap();
    let records = ports.list().unwrap();
    let planned = planned(&records, |n| n == "demo");
    assert_eq!(planned.len(), 1);
    assert_eq!(planned.iter().next().unwrap().owner, "a");
    let kept: BTreeSet<String> = [host_veth_name("demo", "a", "eth0")].into();
    let lock = ports.lock().unwrap();
    let dropped = ports.retain_attached(&lock, &kept).unwrap();
    drop(lock);
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].owner.container_id, "b");
    assert_eq!(ports.list().unwrap().len(), 1);
}

#[test]
fn concurrent_publishers_never_share_a_port() {
    let d = tempfile::tempdir().unwrap();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let dir = d.path().to_path_buf();
            std::thread::spawn(move || {
                Ports::new(&dir)
                    .publish(
                        "demo",
                        &owner(&format!("c{i}")),
                        ip(2 + i as u8),
                        &[PortRequest {
                            proto: PortProto::Tcp,
                            host_first: 9000,
                            host_last: 9009,
                            container_port: 80,
                        }],
                    )
                    .map(|p| p[0].host_port)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut won: Vec<u16> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .copied()
        .collect();
    won.sort();
    assert_eq!(won, (9000..=9009).collect::<Vec<_>>(), "{results:?}");
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 10);
}
