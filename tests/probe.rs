//! The probes against real namespaces joined by veth pairs (run as root).
//! Every test makes its own namespaces `vxm-p-<pid>-<n>`, removed on drop.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use vxmesh::dataplane::netns::{Netns, NetnsGuard};
use vxmesh_lab::probe::{self, EchoOutcome, PairJob, Refusal};

const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// On the link, but nobody has it.
const NOBODY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 77);

fn new_ns() -> NetnsGuard {
    NetnsGuard::create(&common::unique_ns("p-")).expect("create namespace")
}

fn ip(ns: &NetnsGuard, args: &[&str]) {
    let out = Command::new("ip")
        .arg("-n")
        .arg(&ns.name)
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {} {args:?}: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wait until `dev` is operationally up: until the kernel's link watcher has
/// seen the carrier, the device drops what is sent (even the first ARP request).
fn wait_oper_up(ns: &NetnsGuard, dev: &str) {
    let t0 = Instant::now();
    loop {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&ns.name)
            .args(["-o", "link", "show", "dev", dev])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("state UP") {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{dev} in {} never came up",
            ns.name
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Two namespaces joined by a veth pair `va` (A_IP) -- `vb` (B_IP), both with `mtu`.
struct Link {
    a: NetnsGuard,
    b: NetnsGuard,
}

impl Link {
    fn new(mtu: u32) -> Link {
        let link = Link {
            a: new_ns(),
            b: new_ns(),
        };
        let mtu = mtu.to_string();
        ip(
            &link.a,
            &[
                "link", "add", "va", "mtu", &mtu, "type", "veth", "peer", "name", "vb", "mtu", &mtu,
            ],
        );
        ip(&link.a, &["link", "set", "vb", "netns", &link.b.name]);
        ip(
            &link.a,
            &["addr", "add", &format!("{A_IP}/24"), "dev", "va"],
        );
        ip(
            &link.b,
            &["addr", "add", &format!("{B_IP}/24"), "dev", "vb"],
        );
        ip(&link.a, &["link", "set", "va", "up"]);
        ip(&link.b, &["link", "set", "vb", "up"]);
        wait_oper_up(&link.a, "va");
        wait_oper_up(&link.b, "vb");
        link
    }

    fn a(&self) -> Netns {
        self.a.open().unwrap()
    }

    fn b(&self) -> Netns {
        self.b.open().unwrap()
    }
}

fn is_reply(out: &EchoOutcome) -> bool {
    matches!(out, EchoOutcome::Reply { .. })
}

#[test]
fn echo_works_both_ways() {
    let link = Link::new(1500);
    let out = probe::icmp_echo(&link.a(), B_IP, 56, false, Duration::from_secs(2)).unwrap();
    assert!(is_reply(&out), "a -> b: {out}");
    let out = probe::icmp_echo(&link.b(), A_IP, 56, false, Duration::from_secs(2)).unwrap();
    assert!(is_reply(&out), "b -> a: {out}");
    // Tiny and empty payloads are still matched.
    for len in [0, 3, 12] {
        let out = probe::icmp_echo(&link.a(), B_IP, len, true, Duration::from_secs(2)).unwrap();
        assert!(is_reply(&out), "payload {len}: {out}");
    }
}

#[test]
fn echo_to_an_unused_address_times_out_quickly() {
    let link = Link::new(1500);
    let t0 = Instant::now();
    let out = probe::icmp_echo(&link.a(), NOBODY, 56, false, Duration::from_millis(300)).unwrap();
    assert_eq!(out, EchoOutcome::Timeout);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn dont_fragment_echo_at_the_mtu_passes_and_one_byte_more_is_refused() {
    let link = Link::new(1450);
    let full = probe::icmp_payload_for_ip_len(1450);
    assert_eq!(full, 1422);
    let out = probe::icmp_echo(&link.a(), B_IP, full, true, Duration::from_secs(2)).unwrap();
    assert!(is_reply(&out), "full-MTU DF packet: {out}");
    let out = probe::icmp_echo(&link.a(), B_IP, full + 1, true, Duration::from_secs(2)).unwrap();
    match &out {
        EchoOutcome::Refused {
            reason: Refusal::Local { errno, .. },
        } => assert_eq!(*errno, libc::EMSGSIZE, "{out}"),
        other => panic!("MTU+1 with DF must be refused locally: {other}"),
    }
    // Without DF the kernel fragments it, and the reply (fragmented too) is reassembled.
    let out = probe::icmp_echo(&link.b(), A_IP, 4000, false, Duration::from_secs(2)).unwrap();
    assert!(is_reply(&out), "fragmented packet: {out}");
}

#[test]
fn fragmentation_needed_from_a_router_is_refused_with_its_mtu() {
    // a (1500) -- r -- (1400) b
    let (a, r, b) = (new_ns(), new_ns(), new_ns());
    ip(
        &a,
        &["link", "add", "va", "type", "veth", "peer", "name", "ra"],
    );
    ip(&a, &["link", "set", "ra", "netns", &r.name]);
    ip(
        &b,
        &[
            "link", "add", "vb", "mtu", "1400", "type", "veth", "peer", "name", "rb", "mtu", "1400",
        ],
    );
    ip(&b, &["link", "set", "rb", "netns", &r.name]);
    ip(&a, &["addr", "add", "198.18.1.1/24", "dev", "va"]);
    ip(&r, &["addr", "add", "198.18.1.254/24", "dev", "ra"]);
    ip(&r, &["addr", "add", "198.18.2.254/24", "dev", "rb"]);
    ip(&b, &["addr", "add", "198.18.2.1/24", "dev", "vb"]);
    for (ns, dev) in [(&a, "va"), (&r, "ra"), (&r, "rb"), (&b, "vb")] {
        ip(ns, &["link", "set", dev, "up"]);
    }
    for (ns, dev) in [(&a, "va"), (&r, "ra"), (&r, "rb"), (&b, "vb")] {
        wait_oper_up(ns, dev);
    }
    ip(
        &a,
        &["route", "add", "198.18.2.0/24", "via", "198.18.1.254"],
    );
    ip(
        &b,
        &["route", "add", "198.18.1.0/24", "via", "198.18.2.254"],
    );
    r.open()
        .unwrap()
        .run(|| vxmesh::dataplane::sysctl::set_ip_forward(true))
        .unwrap();
    let (a, dst) = (a.open().unwrap(), Ipv4Addr::new(198, 18, 2, 1));

    let out = probe::icmp_echo(
        &a,
        dst,
        probe::icmp_payload_for_ip_len(1400),
        true,
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(is_reply(&out), "1400 fits the whole path: {out}");
    let out = probe::icmp_echo(
        &a,
        dst,
        probe::icmp_payload_for_ip_len(1500),
        true,
        Duration::from_secs(2),
    )
    .unwrap();
    let want = Refusal::Icmp {
        from: Ipv4Addr::new(198, 18, 1, 254),
        icmp_type: 3,
        code: 4,
        next_hop_mtu: Some(1400),
    };
    assert_eq!(out, EchoOutcome::Refused { reason: want }, "{out}");
    // The learned path MTU now refuses it locally.
    let out = probe::icmp_echo(
        &a,
        dst,
        probe::icmp_payload_for_ip_len(1500),
        true,
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(matches!(out, EchoOutcome::Refused { .. }), "{out}");
}

#[test]
fn continuous_probe_loses_nothing_on_a_healthy_link() {
    let link = Link::new(1500);
    let stream = probe::continuous(&link.a(), B_IP, Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let stats = stream.stop();
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "stop took {:?}",
        t0.elapsed()
    );
    assert!(stats.sent >= 80, "{stats:?}");
    assert_eq!(stats.lost, 0, "{stats:?}");
    assert_eq!(stats.received, stats.sent, "{stats:?}");
    assert!(
        stats.lost_seqs.is_empty() && stats.error.is_none(),
        "{stats:?}"
    );
    assert!(stats.max_gap_ms < 500, "{stats:?}");
}

#[test]
fn continuous_probe_reports_losses_while_the_link_is_down() {
    let link = Link::new(1500);
    let stream = probe::continuous(&link.a(), B_IP, Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    ip(&link.a, &["link", "set", "va", "down"]);
    std::thread::sleep(Duration::from_millis(500));
    ip(&link.a, &["link", "set", "va", "up"]);
    std::thread::sleep(Duration::from_millis(600));
    let stats = stream.stop();
    eprintln!("{stats:?}");
    assert!(stats.error.is_none(), "{stats:?}");
    assert!(
        stats.lost >= 10,
        "a 500 ms outage at 20 ms intervals: {stats:?}"
    );
    assert_eq!(stats.sent, stats.received + stats.lost, "{stats:?}");
    assert_eq!(stats.lost_seqs.len() as u64, stats.lost, "{stats:?}");
    assert!(stats.max_gap_ms >= 400, "{stats:?}");
    // Nothing was lost before the link went down, and replies resumed after it came back.
    assert!(stats.lost_seqs[0] >= 10, "{stats:?}");
    let last_lost = *stats.lost_seqs.last().unwrap();
    assert!(
        last_lost + 5 < stats.sent,
        "no replies after the outage: {stats:?}"
    );
}

#[test]
fn dropping_a_stream_ends_it() {
    let link = Link::new(1500);
    let stream = probe::continuous(&link.a(), NOBODY, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    drop(stream);
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "drop took {:?}",
        t0.elapsed()
    );
}

#[test]
fn tcp_transfer_of_64_mib_arrives_intact() {
    let link = Link::new(1500);
    let r = probe::tcp_transfer(
        &link.b(),
        B_IP,
        &link.a(),
        64 << 20,
        Duration::from_secs(30),
    )
    .unwrap();
    eprintln!("{r:?}");
    assert_eq!(r.bytes, 64 << 20);
    assert_eq!(r.sent_sha256, r.received_sha256);
    assert_eq!(r.sent_sha256.len(), 64);
    assert!(r.throughput_mbit_s > 0.0);
}

#[test]
fn transfer_to_a_closed_port_fails_clearly() {
    let link = Link::new(1500);
    let t0 = Instant::now();
    let err = probe::tcp_send(
        &link.a(),
        SocketAddrV4::new(B_IP, 9),
        1 << 20,
        Duration::from_secs(5),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("refused") && msg.contains("198.18.0.2:9") && msg.contains(&link.a.name),
        "{msg}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    // A server address its namespace does not have.
    let err =
        probe::tcp_transfer(&link.b(), A_IP, &link.a(), 1024, Duration::from_secs(5)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("listen on 198.18.0.1") && msg.contains(&link.b.name),
        "{msg}"
    );
}

#[test]
fn pair_matrix_reports_each_pair_in_order() {
    let link = Link::new(1500);
    let iso = |mut j: PairJob| {
        j.expect_reach = false;
        j
    };
    let missing = format!("vxm-p-{}-missing", std::process::id());
    let jobs = vec![
        PairJob::new(&link.a.name, B_IP),
        PairJob::new(&link.b.name, A_IP),
        iso(PairJob::new(&link.a.name, NOBODY)),
        PairJob::new(&link.b.name, NOBODY),
        PairJob::new(&missing, B_IP),
    ];
    let t0 = Instant::now();
    let res = probe::probe_pairs(&jobs, Duration::from_millis(200));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(res.len(), jobs.len());
    for (job, r) in jobs.iter().zip(&res) {
        assert_eq!((&job.src_ns, job.dst), (&r.src_ns, r.dst));
    }
    assert!(
        res[0].ok() && res[0].reached && res[0].attempts == 1 && res[0].rtt_ms.is_some(),
        "{}",
        res[0]
    );
    assert!(res[1].ok() && res[1].reached, "{}", res[1]);
    assert!(
        res[2].ok() && !res[2].reached && res[2].attempts == 3,
        "isolated as expected: {}",
        res[2]
    );
    assert!(!res[3].ok() && res[3].attempts == 3, "{}", res[3]);
    assert!(
        res[3].to_string().contains("no reply after 3 attempt"),
        "{}",
        res[3]
    );
    assert!(
        !res[4].ok() && res[4].to_string().contains("does not exist"),
        "{}",
        res[4]
    );
}
