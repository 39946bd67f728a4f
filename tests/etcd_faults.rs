//! The etcd store under faults, on labs with a 3-member etcd cluster (each
//! member in a namespace of its own on the lab's underlay), with the lab's
//! invariant checker running through every test: etcd and every node's
//! kernel sampled every 250 ms; no subnet or address used by two nodes at
//! once, no live node's record disappearing, every node's peers equal to
//! the live members within TTL + settle + 2 s after a fault heals, zero lost replies
//! between the nodes the fault does not touch. Each test prints one
//! `invariants fault=...` line (quoted in docs/reliability.md) and asserts
//! zero violations. Root; everything inside the lab's namespaces.
//!
//!     cargo test --test etcd_faults -- --nocapture --test-threads=2 | grep '^invariants'

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use vxmesh::config::Mode;
use vxmesh::store::etcd;
use vxmesh_lab::lab::invariants::{CheckerOptions, InvariantChecker, InvariantReport};
use vxmesh_lab::lab::{LabSpec, LabStore};

/// The agents' lease TTL.
const TTL: Duration = Duration::from_secs(3);
/// How long a join may take while a majority of etcd answers (a join takes
/// well under a second on a healthy lab; the machine is shared).
const JOIN_BOUND: Duration = Duration::from_secs(10);

fn spec3(tag: &str, nodes: usize) -> LabSpec {
    let mut s = spec(tag, nodes, 1, Mode::Routed, 1);
    s.store = LabStore::Etcd;
    s.etcd_members = 3;
    s.ttl = TTL;
    s
}

/// Print the report's line and assert it is clean and really checked.
fn assert_clean(fault: &str, r: &InvariantReport) {
    println!("{}", r.line(fault));
    println!("{r}");
    assert!(r.samples >= 20, "too few samples:\n{r}");
    assert!(r.etcd_samples > 0, "etcd never sampled:\n{r}");
    assert!(r.peer_checks > 0, "peers never checked:\n{r}");
    assert!(r.record_checks > 0, "records never checked:\n{r}");
    assert!(r.replies_sent > 100, "too few probes:\n{r}");
    assert!(
        r.violations.is_empty(),
        "fault={fault}: {} violations:\n{r}",
        r.violations.len()
    );
    for w in r.windows.iter().filter(|w| w.healed_ms.is_some()) {
        assert!(
            w.converged_after_ms.is_some(),
            "fault={fault}: never converged after '{}':\n{r}",
            w.label
        );
    }
}

/// Is `node`'s record in etcd (network demo)? Read from the underlay.
async fn record_present(lab: &vxmesh_lab::lab::Lab, node: &str) -> bool {
    let key = format!("{}/networks/demo/nodes/{node}", etcd::DEFAULT_PREFIX);
    lab.in_underlay(move |co| async move {
        let mut c = etcd::connect(&co).await?;
        Ok(c.get(key, None).await?.count() > 0)
    })
    .await
    .unwrap()
}

/// A node cut off from every etcd member for longer than its lease TTL
/// (TTL + 1.5 s: its lease runs out, the partition heals within the
/// quarantine the store promises, 2 x TTL), while a new node tries to join a
/// network with no free subnet (a /22 of four /24s, all held): the
/// partitioned node's subnet must not go to the newcomer while the node
/// still serves it (issue 19, finding 3), and once healed the node must hold
/// its own subnet and records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_partitioned_from_etcd_longer_than_the_ttl_keeps_its_subnet() {
    let mut s = spec3("xp", 4);
    s.routed_cidr = Some("172.18.0.0/22".parse().unwrap());
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let own = lab.node("host1").unwrap().subnets["demo"];
        let checker =
            InvariantChecker::start(&lab, CheckerOptions::new(TTL, &["host2", "host3", "host4"]))
                .await
                .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let w = checker.fault("host1 cut off from etcd", &["host1"]);
        lab.partition("host1", true, &[]).unwrap();
        // A newcomer starts while host1's lease runs out.
        let newcomer = lab.add_host().await.unwrap();
        lab.start_agent(&newcomer).unwrap();
        tokio::time::sleep(TTL + Duration::from_millis(1500)).await;
        assert!(
            !record_present(&lab, "host1").await,
            "host1's lease did not run out: the partition is too short to test anything"
        );
        lab.heal_partition("host1").unwrap();
        checker.healed(w);
        let t_heal = Instant::now();
        let report = checker.stop().await.unwrap();
        lab.stop_agent_async(&newcomer, Signal::SIGKILL)
            .await
            .unwrap();
        println!(
            "partition: host1 {own}, checker stopped {} ms after the heal",
            t_heal.elapsed().as_millis()
        );
        assert_clean("partition_from_etcd", &report);
        // host1 serves its own subnet again.
        let state = vxmesh::state::read_network(&lab.node("host1").unwrap().state_dir, "demo")
            .unwrap()
            .state;
        assert_eq!(state.pool, own, "host1 came back with another subnet");
    }
    assert_all_gone(&name);
}

/// The etcd leader killed (`kill -9`) for twice the TTL, a node joining
/// meanwhile, the member restarted: quorum holds throughout, so nothing of
/// vxmesh may notice beyond the join, and the join itself must not wait
/// for the dead member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_leader_killed_and_restarted_changes_nothing() {
    let s = spec3("xl", 3);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let checker =
            InvariantChecker::start(&lab, CheckerOptions::new(TTL, &["host1", "host2", "host3"]))
                .await
                .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let leader = lab.etcd_leader().await.unwrap();
        let w = checker.fault(&format!("leader {leader} killed"), &[]);
        lab.kill_member(&leader).unwrap();
        let t0 = Instant::now();
        let new_leader = lab.etcd_leader().await.unwrap();
        let elected = t0.elapsed();
        assert_ne!(new_leader, leader);
        let node = lab.add_node().await.unwrap();
        let joined = t0.elapsed();
        tokio::time::sleep((TTL * 2).saturating_sub(t0.elapsed())).await;
        lab.start_member(&leader).await.unwrap();
        checker.healed(w);
        let report = checker.stop().await.unwrap();
        println!(
            "leader_killed: {leader} -> {new_leader} elected in {} ms, {node} joined in {} ms",
            elected.as_millis(),
            joined.as_millis()
        );
        assert_clean("leader_killed", &report);
        // Two members of three answer: a join must not wait for the dead one.
        assert!(
            joined < JOIN_BOUND,
            "{node} took {} ms to join with the leader dead (bound {JOIN_BOUND:?})",
            joined.as_millis()
        );
    }
    assert_all_gone(&name);
}

/// The etcd leader paused (SIGSTOP) for twice the TTL and resumed: its
/// sockets stay open and nothing answers, so clients must give up on it by
/// their own deadlines: no lease may run out and nothing may change while it
/// is paused (every lease keeper moves to a member that answers).
///
/// After the resume, etcd 3.4.23 (Debian's, what the lab runs) has a bug of
/// its own (etcd-io/etcd#12528, #15247; fixed by etcd PR #16822 in later
/// 3.4 and 3.5 releases): the resumed old leader still believes it is the
/// primary lessor and revokes the leases it saw no renewal of during the
/// pause, although the new leader renewed them. In about one run of five
/// this revokes node leases ~0.1 s after SIGCONT. vxmesh cannot prevent
/// that, but its data plane must not notice: peers keep a node whose
/// records vanished while its quarantine marker lives for the settle
/// window, the node re-publishes within it, and no reply is lost. The test
/// asserts exactly that in every run (zero lost replies, peers unchanged,
/// every node back on its own subnet) and prints how many leases etcd
/// revoked; the record missing from etcd itself is the one thing allowed,
/// for those nodes only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_etcd_leader_loses_no_lease() {
    let s = spec3("xs", 3);
    let name = s.name.clone();
    let hosts = ["host1", "host2", "host3"];
    {
        let lab = up(&s).await;
        let subnets: Vec<_> = hosts
            .iter()
            .map(|n| lab.node(n).unwrap().subnets["demo"])
            .collect();
        let checker = InvariantChecker::start(&lab, CheckerOptions::new(TTL, &hosts))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let leader = lab.etcd_leader().await.unwrap();
        let w = checker.fault(&format!("leader {leader} paused"), &[]);
        lab.pause_member(&leader).unwrap();
        tokio::time::sleep(TTL * 2 + Duration::from_secs(1)).await;
        let log = |n: &str| std::fs::read_to_string(&lab.node(n).unwrap().agent_log).unwrap();
        let paused_logs: Vec<String> = hosts.iter().map(|n| log(n)).collect();
        lab.resume_member(&leader).unwrap();
        checker.healed(w);
        let report = checker.stop().await.unwrap();
        println!("{}", report.line("member_paused"));
        println!("{report}");
        for (n, l) in hosts.iter().zip(&paused_logs) {
            assert!(
                !l.contains("lease expired"),
                "{n} lost its lease while the leader was paused:\n{l}"
            );
        }
        let healed_ms = report.windows[0].healed_ms.unwrap();
        // etcd 3.4's resumed old leader may revoke leases the new leader was
        // renewing (etcd-io/etcd#12528): the node's records vanish from etcd
        // until it re-grants and re-publishes (under a second). Peers keep it
        // for the settle window meanwhile (its quarantine marker lives), so
        // the data plane must not notice: zero lost replies, peer tables
        // unchanged, in every run. The only thing allowed is what the checker
        // reads from etcd itself: that node's record missing after the
        // resume, and only for a node whose own log shows the lease loss.
        let revoked: Vec<&str> = hosts
            .iter()
            .zip(&paused_logs)
            .filter(|(n, before)| log(n)[before.len()..].contains("lease expired"))
            .map(|(n, _)| *n)
            .collect();
        println!(
            "member_paused: etcd's resumed old leader revoked the leases of {revoked:?} (etcd-io/etcd#12528); \
             {} records-missing violation runs after the resume",
            report
                .violations
                .iter()
                .filter(|v| v.rule == "live-record-missing")
                .count()
        );
        let etcd_side = |v: &&vxmesh_lab::lab::invariants::ViolationRun| {
            v.rule == "live-record-missing"
                && v.first_ms >= healed_ms
                && revoked.contains(&v.node.as_str())
        };
        let bad: Vec<_> = report.violations.iter().filter(|v| !etcd_side(v)).collect();
        assert!(
            bad.is_empty(),
            "member_paused: {} violations:\n{bad:#?}\n{report}",
            bad.len()
        );
        assert!(report.samples >= 20, "too few samples:\n{report}");
        assert!(report.peer_checks > 0, "peers never checked:\n{report}");
        assert!(report.replies_sent > 100, "too few probes:\n{report}");
        assert!(
            report.windows[0].converged_after_ms.is_some(),
            "never converged after the resume:\n{report}"
        );
        // Every node still serves the subnet it had (the hold lease kept it
        // even where etcd revoked the node lease).
        for (n, own) in hosts.iter().zip(&subnets) {
            let st = vxmesh::state::read_network(&lab.node(n).unwrap().state_dir, "demo")
                .unwrap()
                .state;
            assert_eq!(st.pool, *own, "{n} came back with another subnet");
        }
    }
    assert_all_gone(&name);
}

/// etcd restored from a snapshot taken before a node joined and another
/// left: the revision moves back, the joined node's records vanish and the
/// departed node's come back until their lease runs out; then another node
/// joins, writing at revisions the agents' watches had passed before the
/// rollback. Watches must see it all (issue 19, finding 5): every peer
/// table holds exactly the live nodes within TTL + settle + 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_rolled_back_to_a_snapshot_heals_every_peer_table() {
    let s = spec3("xr", 3);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let snap = lab.info.dir.join("etcd").join("before.db");
        let checker = InvariantChecker::start(&lab, CheckerOptions::new(TTL, &["host1", "host2"]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rev_snap = lab.save_etcd_snapshot(&snap).await.unwrap();
        let joined = lab.add_node().await.unwrap();
        lab.remove_node("host3", false).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rev_before = lab.etcd_revision().await.unwrap();
        let w = checker.fault("etcd restored from a snapshot", &[&joined]);
        let t0 = Instant::now();
        lab.restore_etcd_snapshot(&snap).await.unwrap();
        let down = t0.elapsed();
        let rev_after = lab.etcd_revision().await.unwrap();
        // A node joining after the rollback writes below the revisions
        // the agents' watches had reached: they must see it all the same.
        let late = lab.add_node().await.unwrap();
        checker.healed(w);
        let report = checker.stop().await.unwrap();
        println!(
            "rollback: snapshot at revision {rev_snap}, {rev_before} before the restore, {rev_after} after; etcd away {} ms; {late} joined after it",
            down.as_millis()
        );
        assert!(
            rev_after < rev_before,
            "the restore did not move the revision back"
        );
        assert_clean("snapshot_rollback", &report);
    }
    assert_all_gone(&name);
}

/// Overload: nine agents join at once next to three running ones, with the
/// shortest TTL (2 s), then all nine are killed and restarted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_agents_joining_and_restarting_at_once_with_a_short_ttl() {
    let ttl = Duration::from_secs(2);
    let mut s = spec3("xo", 3);
    s.ttl = ttl;
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let checker =
            InvariantChecker::start(&lab, CheckerOptions::new(ttl, &["host1", "host2", "host3"]))
                .await
                .unwrap();
        let joined = lab.join_at_once(9, Duration::from_secs(60)).await.unwrap();
        let slowest = joined.iter().map(|(_, d)| *d).max().unwrap();
        tokio::time::sleep(ttl + Duration::from_secs(3)).await;
        let names: Vec<String> = joined.iter().map(|(n, _)| n.clone()).collect();
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let w = checker.fault("nine agents restarted", &refs);
        for n in &names {
            lab.stop_agent_async(n, Signal::SIGKILL).await.unwrap();
        }
        let t0 = Instant::now();
        for n in &names {
            lab.start_agent(n).unwrap();
        }
        for n in &names {
            lab.wait_agent_ready(n, Duration::from_secs(60))
                .await
                .unwrap();
        }
        let rejoined = t0.elapsed();
        checker.healed(w);
        let report = checker.stop().await.unwrap();
        println!(
            "overload: 9 joined at once, slowest in {} ms; restarted at once, all ready in {} ms",
            slowest.as_millis(),
            rejoined.as_millis()
        );
        assert_clean("overload", &report);
    }
    assert_all_gone(&name);
}

/// `lab up --etcd-members 3` from the CLI: three members, each in its own
/// namespace, every one an endpoint of the agents; `lab down` removes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lab_with_three_etcd_members() {
    let name = unique("xc");
    let (code, out, err) = vxmesh(&[
        "lab",
        "up",
        "--name",
        &name,
        "--store",
        "etcd",
        "--etcd-members",
        "3",
        "--nodes",
        "2",
        "--containers",
        "1",
    ]);
    let _guard = scopeguard(&name);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("etcd://198.18.0.254:2379,198.18.0.253:2379,198.18.0.252:2379"),
        "{out}"
    );
    for i in 1..=3 {
        let ns = format!("vxm-{name}-etcd{i}");
        assert!(out.contains(&format!("etcd{i} in {ns} pid ")), "{out}");
        assert!(
            ip(&ns, &["-4", "addr", "show", "eth0"]).contains(&format!("198.18.0.{}/23", 255 - i)),
            "member {i} address"
        );
    }
    let (code, out, err) = vxmesh(&["lab", "check", &name]);
    assert_eq!(code, 0, "{out}{err}");
    let lab = vxmesh_lab::lab::Lab::load(&name).unwrap();
    let agent = std::fs::read(format!(
        "/proc/{}/cmdline",
        lab.info.nodes[0].agent_pid.unwrap()
    ))
    .unwrap();
    assert!(
        String::from_utf8_lossy(&agent)
            .contains("etcd://198.18.0.254:2379,198.18.0.253:2379,198.18.0.252:2379"),
        "agents get every member"
    );
    // A static lab refuses the option.
    let (code, _, err) = vxmesh(&["lab", "up", "--name", &unique("xd"), "--etcd-members", "3"]);
    assert_ne!(code, 0);
    assert!(err.contains("--store etcd"), "{err}");
    let (code, out, err) = vxmesh(&["lab", "down", &name]);
    assert_eq!(code, 0, "{out}{err}");
    assert_all_gone(&name);
}

/// Takes a CLI-built lab down even when an assertion fails.
struct Down(String);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = vxmesh_lab::lab::down_by_name(&self.0);
    }
}
fn scopeguard(name: &str) -> Down {
    Down(name.to_string())
}
