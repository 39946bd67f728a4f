//! CNI spec conformance: the plugin driven exactly as a runtime drives it
//! (environment + stdin, run in the node's namespace), spec 1.0.0 and 1.1.0.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use vxmesh::cni::AddResult;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::{self, NetnsGuard};
use vxmesh_lab::probe;

/// Run the plugin in `host_ns` with CNI_* variables and `conf` on stdin.
fn cni(host_ns: &str, command: &str, env: &[(&str, &str)], conf: &str) -> Out {
    run_cni(&exe(), host_ns, command, env, conf)
}

fn conf(version: &str, network: &str, state_dir: &str) -> String {
    json!({ "cniVersion": version, "name": "overlay", "type": "vxmesh", "network": network, "stateDir": state_dir }).to_string()
}

fn with_prev(conf: &str, prev: &Value) -> String {
    let mut v: Value = serde_json::from_str(conf).unwrap();
    v["prevResult"] = prev.clone();
    v.to_string()
}

fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_conformance_both_versions() {
    let s = spec("cn", 2, 1, Mode::Routed, 1);
    let mut lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let peer = lab.container_on("host2").unwrap().clone();

    // VERSION
    let v = cni(&h1.netns, "VERSION", &[], "");
    assert_eq!(v.code, 0, "{}", v.stderr);
    let sup: Vec<&str> = v.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(sup.contains(&"1.0.0") && sup.contains(&"1.1.0"));

    for (i, version) in ["1.0.0", "1.1.0"].iter().enumerate() {
        let cname = format!("vxm-{}-cni{i}", lab.info.name);
        let guard = NetnsGuard::create(&cname).unwrap();
        let id = format!("ctr{i}");
        let env = [
            ("CNI_CONTAINERID", id.as_str()),
            ("CNI_NETNS", &*netns_path(&cname)),
            ("CNI_IFNAME", "eth0"),
        ];
        let c = conf(version, "demo", &sd);
        // ADD
        let add = cni(&h1.netns, "ADD", &env, &c);
        assert_eq!(add.code, 0, "ADD {version}: {} {}", add.json, add.stderr);
        assert_eq!(add.json["cniVersion"], json!(version));
        let addr = add.json["ips"][0]["address"].as_str().unwrap().to_string();
        assert!(addr.starts_with("172.18.10."), "{addr}");
        assert_eq!(add.json["ips"][0]["gateway"], json!("172.18.10.1"));
        assert_eq!(add.json["interfaces"][1]["name"], json!("eth0"));
        assert_eq!(
            add.json["interfaces"][1]["sandbox"],
            json!(netns_path(&cname))
        );
        assert_eq!(add.json["ips"][0]["interface"], json!(1));
        // The result is exactly the typed CNI result, field for field.
        let typed: AddResult = serde_json::from_value(add.json.clone())
            .unwrap_or_else(|e| panic!("ADD {version}: not a CNI result ({e}): {}", add.json));
        assert_eq!(typed.to_json(None), add.json);
        assert_eq!(
            Some(typed.first_ipv4().unwrap().to_string()),
            addr.split('/').next().map(str::to_string)
        );
        // Cross-host reachability of the plugin-attached container.
        let ns = guard.open().unwrap();
        let reached = (0..3).any(|_| {
            matches!(
                probe::icmp_echo(&ns, peer.ip, 56, false, Duration::from_secs(1)),
                Ok(probe::EchoOutcome::Reply { .. })
            )
        });
        assert!(
            reached,
            "container attached by CNI {version} cannot reach {}",
            peer.ip
        );
        // CHECK against prevResult
        let chk = cni(&h1.netns, "CHECK", &env, &with_prev(&c, &add.json));
        assert_eq!(chk.code, 0, "CHECK {version}: {}", chk.json);
        // Break it: CHECK must notice.
        assert!(
            Command::new("ip")
                .args(["-n", &cname, "route", "del", "default"])
                .status()
                .unwrap()
                .success()
        );
        let chk = cni(&h1.netns, "CHECK", &env, &with_prev(&c, &add.json));
        assert_ne!(chk.code, 0, "CHECK must fail without the default route");
        assert!(
            chk.json["msg"].as_str().unwrap().contains("route"),
            "{}",
            chk.json
        );
        // DEL, twice, then with the namespace gone.
        let del = cni(&h1.netns, "DEL", &env, &c);
        assert_eq!(del.code, 0, "{}", del.json);
        let del = cni(&h1.netns, "DEL", &env, &c);
        assert_eq!(del.code, 0, "repeated DEL: {}", del.json);
        drop(guard);
        let del = cni(&h1.netns, "DEL", &env, &c);
        assert_eq!(del.code, 0, "DEL after the namespace is gone: {}", del.json);
        let del = cni(
            &h1.netns,
            "DEL",
            &[("CNI_CONTAINERID", "never-seen"), ("CNI_IFNAME", "eth0")],
            &c,
        );
        assert_eq!(del.code, 0, "DEL of an unknown container: {}", del.json);
    }

    // STATUS (1.1.0): fine while the agent runs, 50 when it does not.
    let st = cni(&h1.netns, "STATUS", &[], &conf("1.1.0", "demo", &sd));
    assert_eq!(st.code, 0, "{}", st.json);
    lab.stop_agent("host1", Signal::SIGTERM).unwrap();
    let st = cni(&h1.netns, "STATUS", &[], &conf("1.1.0", "demo", &sd));
    assert_ne!(st.code, 0);
    assert_eq!(st.json["code"], json!(50));
    let st = cni(
        &h1.netns,
        "STATUS",
        &[],
        &conf("1.1.0", "demo", "/nonexistent/vxmesh"),
    );
    assert_eq!(st.json["code"], json!(50));
    lab.start_agent("host1").unwrap();
    lab.wait_agent_ready("host1", Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes() {
    let s = spec("ce", 1, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let cname = format!("vxm-{}-e", lab.info.name);
    let _g = NetnsGuard::create(&cname).unwrap();
    let p = netns_path(&cname);
    let full = [
        ("CNI_CONTAINERID", "x"),
        ("CNI_NETNS", p.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    // Missing environment: 4.
    let o = cni(
        &h1.netns,
        "ADD",
        &[("CNI_NETNS", p.as_str()), ("CNI_IFNAME", "eth0")],
        &conf("1.1.0", "demo", &sd),
    );
    assert_eq!(
        (o.code != 0, o.json["code"].clone()),
        (true, json!(4)),
        "{}",
        o.json
    );
    assert!(o.json["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
    // Bad JSON: 6.
    let o = cni(&h1.netns, "ADD", &full, "{\"cniVersion\": ");
    assert_eq!(o.json["code"], json!(6), "{}", o.json);
    // Unknown network: 7, naming the served ones.
    let o = cni(&h1.netns, "ADD", &full, &conf("1.1.0", "nosuch", &sd));
    assert_eq!(o.json["code"], json!(7), "{}", o.json);
    assert!(
        o.json["details"].as_str().unwrap().contains("demo"),
        "{}",
        o.json
    );
    // Unsupported version: 1.
    let o = cni(&h1.netns, "ADD", &full, &conf("0.2.0", "demo", &sd));
    assert_eq!(o.json["code"], json!(1), "{}", o.json);
    // Error output carries the request's version when it is supported.
    let o = cni(&h1.netns, "ADD", &full, &conf("1.0.0", "nosuch", &sd));
    assert_eq!(o.json["cniVersion"], json!("1.0.0"));
    // Nothing was attached by any of these.
    assert!(!ip(&cname, &["link"]).contains("eth0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_adds_then_dels_and_gc() {
    let s = spec("cc", 1, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let c = conf("1.1.0", "demo", &sd);
    let names: Vec<String> = (0..50)
        .map(|i| format!("vxm-{}-{i}", lab.info.name))
        .collect();
    let guards: Vec<NetnsGuard> = names
        .iter()
        .map(|n| NetnsGuard::create(n).unwrap())
        .collect();
    let run_all = |cmd: &'static str| {
        let handles: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let (host, c, p, id) =
                    (h1.netns.clone(), c.clone(), netns_path(n), format!("c{i}"));
                std::thread::spawn(move || {
                    cni(
                        &host,
                        cmd,
                        &[
                            ("CNI_CONTAINERID", &id),
                            ("CNI_NETNS", &p),
                            ("CNI_IFNAME", "eth0"),
                        ],
                        &c,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    };
    let adds = run_all("ADD");
    let mut ips: Vec<String> = adds
        .iter()
        .map(|o| {
            assert_eq!(o.code, 0, "{} {}", o.json, o.stderr);
            o.json["ips"][0]["address"].as_str().unwrap().to_string()
        })
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "distinct addresses");
    // GC keeps the first 10 only.
    let valid: Vec<Value> = (0..10)
        .map(|i| json!({"containerID": format!("c{i}"), "ifname": "eth0"}))
        .collect();
    let mut gc_conf: Value = serde_json::from_str(&c).unwrap();
    gc_conf["cni.dev/valid-attachments"] = json!(valid);
    let o = cni(&h1.netns, "GC", &[], &gc_conf.to_string());
    assert_eq!(o.code, 0, "{}", o.json);
    let allocs = std::fs::read_dir(h1.state_dir.join("ipam/demo"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .starts_with("172.")
        })
        .count();
    assert_eq!(allocs, 10);
    let veths = ip(&h1.netns, &["-o", "link", "show", "type", "veth"])
        .lines()
        .filter(|l| l.contains(": vxm-"))
        .count();
    assert_eq!(
        veths, 10,
        "GC removed the host veths of invalid attachments"
    );
    for o in run_all("DEL") {
        assert_eq!(o.code, 0, "{}", o.json);
    }
    let allocs = std::fs::read_dir(h1.state_dir.join("ipam/demo"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .starts_with("172.")
        })
        .count();
    assert_eq!(allocs, 0, "all addresses released");
    let veths = ip(&h1.netns, &["-o", "link", "show", "type", "veth"])
        .lines()
        .filter(|l| l.contains(": vxm-"))
        .count();
    assert_eq!(veths, 0, "no host veth left");
    drop(guards);
    assert!(
        netns::list(&format!("vxm-{}-", lab.info.name))
            .iter()
            .all(|n| !n.ends_with("-0"))
    );
}
