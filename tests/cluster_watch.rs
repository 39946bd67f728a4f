//! An agent whose cluster file cannot be watched (inotify refused by the
//! kernel) keeps running and still applies every edit of the file. The
//! refusal is real: the agent binary runs under a seccomp filter that makes
//! `inotify_init1` (or `inotify_add_watch`) fail with the errno a machine
//! out of inotify instances (or watches) gives, so no instance of this
//! machine's per-user limit is used up and the agent's whole path is the
//! production one. Root; namespaces only.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use vxmesh::config::{Mode, NodeFile};
use vxmesh::dataplane::netns::Netns;
use vxmesh_lab::lab::Lab;

const PORT: u16 = 9473;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const AUDIT_ARCH_AARCH64: u32 = 0xC000_00B7;

/// A classic BPF seccomp program: the system calls `nrs` fail with `errno`,
/// every other call is allowed (on this machine's architecture).
fn refusing(nrs: &[libc::c_long], errno: i32) -> Vec<libc::sock_filter> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let arch = if cfg!(target_arch = "aarch64") {
        AUDIT_ARCH_AARCH64
    } else {
        AUDIT_ARCH_X86_64
    };
    let n = nrs.len() as u8;
    // 0: load arch; 1: other arch -> allow; 2: load nr; 3..3+n: match ->
    // refuse; 3+n: allow; 4+n: refuse.
    let mut p = vec![
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4),
        jeq(arch, 0, n + 1),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
    ];
    for (i, nr) in nrs.iter().enumerate() {
        p.push(jeq(*nr as u32, n - i as u8, 0));
    }
    p.push(stmt(libc::BPF_RET, libc::SECCOMP_RET_ALLOW));
    p.push(stmt(
        libc::BPF_RET,
        libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
    ));
    p
}

/// The inotify system calls that create an instance.
fn inotify_inits() -> Vec<libc::c_long> {
    #[cfg(target_arch = "x86_64")]
    return vec![libc::SYS_inotify_init1, libc::SYS_inotify_init];
    #[cfg(not(target_arch = "x86_64"))]
    return vec![libc::SYS_inotify_init1];
}

/// An agent process this test started; killed and reaped on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run the agent of `node` as the lab does (long resync: only the cluster
/// file's watch, or its poll, can bring an edit in quickly), under `filter`.
fn start_filtered_agent(lab: &Lab, node: &str, filter: Vec<libc::sock_filter>) -> Agent {
    let n = lab.node(node).unwrap().clone();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&n.agent_log)
        .unwrap();
    let mut cmd = Command::new(exe());
    cmd.args([
        "--netns",
        &n.netns,
        "-v",
        "agent",
        "--no-config",
        "--cluster",
    ])
    .arg(&lab.info.cluster_file)
    .args(["--node", node, "--state-dir"])
    .arg(&n.state_dir)
    .args(["--resync", "3600", "--metrics"])
    .arg(lab.metrics_addr(node).unwrap().to_string())
    .stdin(Stdio::null())
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    // SAFETY: between fork and exec only prctl(2) runs, on a program built
    // before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Agent(cmd.spawn().expect("start the agent"))
}

/// `GET /metrics` of `node`'s agent, from inside its namespace.
fn scrape(lab: &Lab, node: &str) -> String {
    let addr: SocketAddr = lab.metrics_addr(node).unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    Netns::open(&lab.node(node).unwrap().netns)
        .unwrap()
        .run(move || -> anyhow::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(req.as_bytes())?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            Ok(resp)
        })
        .unwrap_or_else(|e| panic!("scrape {node}: {e}"))
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn routes_to(lab: &Lab, node: &str, subnet: &str) -> bool {
    ip(
        &lab.node(node).unwrap().netns,
        &["route", "show", "proto", "86"],
    )
    .lines()
    .any(|l| l.starts_with(subnet))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_cannot_watch_the_cluster_file_still_apply_its_edits() {
    let mut s = spec("cw", 3, 1, Mode::Routed, 1);
    s.metrics_port = Some(PORT);
    let mut lab = up(&s).await;
    // host1: no inotify instance (EMFILE, as when fs.inotify.max_user_instances
    // is used up); host2: no watch (ENOSPC, max_user_watches); host3 watches.
    let cases = [
        ("host1", refusing(&inotify_inits(), libc::EMFILE), "EMFILE"),
        (
            "host2",
            refusing(&[libc::SYS_inotify_add_watch], libc::ENOSPC),
            "ENOSPC",
        ),
    ];
    let mut agents = Vec::new();
    for (node, filter, errno) in cases {
        lab.stop_agent(node, Signal::SIGTERM).unwrap();
        // The new agent logs after the lab's first one, in the same file.
        let log = lab.node(node).unwrap().agent_log.clone();
        let skip = std::fs::read_to_string(&log).unwrap_or_default().len();
        let mut agent = start_filtered_agent(&lab, node, filter);
        let ours = || {
            let all = std::fs::read_to_string(&log).unwrap_or_default();
            all.get(skip..).unwrap_or_default().to_string()
        };
        let warned = wait_until(Duration::from_secs(10), || ours().contains("agent started")).await;
        let text = ours();
        assert!(
            warned.is_some() && agent.0.try_wait().unwrap().is_none(),
            "the agent of {node} did not run without inotify:\n{text}"
        );
        let warning: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("cannot watch the cluster file"))
            .collect();
        assert_eq!(warning.len(), 1, "{node}: said once:\n{text}");
        assert!(
            warning[0].contains(errno)
                && warning[0].contains(&lab.info.cluster_file.display().to_string())
                && warning[0].contains("fs.inotify.max_user_"),
            "{node}: the warning names the file, the errno and the sysctl: {}",
            warning[0]
        );
        let m = scrape(&lab, node);
        assert_eq!(
            value(&m, "vxmesh_cluster_watch_failures_total"),
            Some(1.0),
            "{m}"
        );
        assert_eq!(value(&m, "vxmesh_cluster_watch_polling"), Some(1.0), "{m}");
        agents.push(agent);
    }
    // The agent that watches counts nothing.
    assert_eq!(
        value(&scrape(&lab, "host3"), "vxmesh_cluster_watch_polling"),
        Some(0.0)
    );

    // An edit reaches every kernel (within the poll interval, not the
    // hour-long resync of the filtered agents).
    let orig = lab.read_cluster().unwrap();
    let mut file = orig.clone();
    file.nodes.push(NodeFile {
        name: "host9".into(),
        underlay_ip: "198.18.0.99".into(),
        underlay_dev: None,
        subnet: Some("172.18.90.0/24".into()),
        subnets: Default::default(),
        public_key: None,
        next_public_key: None,
    });
    lab.write_cluster(&file).unwrap();
    for node in ["host1", "host2", "host3"] {
        let took = wait_until(Duration::from_secs(5), || {
            routes_to(&lab, node, "172.18.90.0/24")
        })
        .await;
        assert!(took.is_some(), "{node} never routed to host9's subnet");
    }
    // And so does the edit back, twice in a row (each poll sees each edit).
    for round in 0..2 {
        let (want, f) = if round == 0 {
            (false, &orig)
        } else {
            (true, &file)
        };
        lab.write_cluster(f).unwrap();
        for node in ["host1", "host2"] {
            let took = wait_until(Duration::from_secs(5), || {
                routes_to(&lab, node, "172.18.90.0/24") == want
            })
            .await;
            assert!(took.is_some(), "{node}: edit {round} not applied");
        }
    }
    for a in &mut agents {
        assert!(a.0.try_wait().unwrap().is_none(), "an agent exited");
    }
    // The whole lab still works: every pair reachable.
    lab.write_cluster(&orig).unwrap();
    let report = lab.check(Duration::from_secs(2)).unwrap();
    assert!(report.failures().is_empty(), "{}", report.matrix());
}
