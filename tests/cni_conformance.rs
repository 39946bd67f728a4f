//! The CNI plugin driven as libcni drives it, for every spec version it
//! lists (0.3.0 to 1.1.0): the environment and configuration a runtime
//! passes, chained prevResults with IPv6 and other plugins' interfaces, GC
//! with each list key and with none, a repeated ADD, DEL without netns or
//! prevResult, requested addresses and MACs, logs and every error code.
//!
//! `VXMESH_CNI_PLUGIN=PATH` runs the suite against another build of the
//! plugin (how the findings of issue 18 were shown to fail on the old one).

mod common;
#[path = "cni_conformance/gc.rs"]
mod gc;
#[path = "cni_conformance/requests.rs"]
mod requests;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::NetnsGuard;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn plugin() -> PathBuf {
    std::env::var_os("VXMESH_CNI_PLUGIN")
        .map(PathBuf::from)
        .unwrap_or_else(exe)
}

impl Out {
    fn err_code(&self) -> Value {
        self.json["code"].clone()
    }
}

/// Run the plugin in `host_ns` as libcni does: a clean environment with
/// CNI_COMMAND, CNI_PATH and `env`, the configuration on stdin.
fn cni(host_ns: &str, command: &str, env: &[(&str, &str)], stdin: &str) -> Out {
    run_cni(&plugin(), host_ns, command, env, stdin)
}

fn conf(version: &str, name: &str, state_dir: &str) -> Value {
    json!({ "cniVersion": version, "name": name, "type": "vxmesh", "network": "demo", "stateDir": state_dir })
}

fn with(mut conf: Value, key: &str, v: Value) -> String {
    conf[key] = v;
    conf.to_string()
}

fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

fn container_env<'a>(id: &'a str, netns: &'a str, ifname: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
    ]
}

/// The container ids holding an address of network `demo` in `state_dir`.
fn holders(state_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(state_dir.join("ipam/demo")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .parse::<std::net::Ipv4Addr>()
                .is_ok()
        })
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|d| serde_json::from_slice::<Value>(&d).ok())
        .filter_map(|v| v["container_id"].as_str().map(str::to_string))
        .collect();
    out.sort();
    out
}

fn host_veth_exists(host_ns: &str, id: &str, ifname: &str) -> bool {
    let name = vxmesh::attach::host_veth_name("demo", id, ifname);
    ip(host_ns, &["-o", "link", "show"]).contains(&format!(": {name}"))
}

fn addresses_in(netns: &str, ifname: &str) -> String {
    ip(netns, &["-o", "-4", "addr", "show", "dev", ifname])
}

/// ADD, CHECK and DEL in every version, each result in its version's
/// shape; VERSION echoes; CHECK before 0.4.0 is error 1; DEL needs neither
/// netns nor prevResult.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_add_check_del() {
    let s = spec("kv", 1, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    for (i, v) in VERSIONS.iter().enumerate() {
        // VERSION: libcni sends {"cniVersion": ...}; the reply echoes it.
        let out = cni(
            &h1.netns,
            "VERSION",
            &[],
            &json!({ "cniVersion": v }).to_string(),
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.json["cniVersion"], json!(v), "VERSION {v}");
        let sup = out.json["supportedVersions"].as_array().unwrap();
        for w in VERSIONS {
            assert!(sup.contains(&json!(w)), "VERSION lists {w}: {}", out.json);
        }

        let cname = format!("vxm-{}-v{i}", lab.info.name);
        let _g = NetnsGuard::create(&cname).unwrap();
        let p = netns_path(&cname);
        let id = format!("ver{i}");
        let env = container_env(&id, &p, "eth0");
        let c = conf(v, "overlay", &sd);
        let add = cni(&h1.netns, "ADD", &env, &c.to_string());
        assert_eq!(add.code, 0, "ADD {v}: {} {}", add.json, add.stderr);
        let r = &add.json;
        assert_eq!(r["cniVersion"], json!(v));
        let before_1_0 = v.starts_with("0.");
        for ipc in r["ips"].as_array().unwrap() {
            assert_eq!(
                ipc.get("version").is_some(),
                before_1_0,
                "ips[].version is a pre-1.0.0 field ({v}): {r}"
            );
        }
        if before_1_0 {
            assert_eq!(r["ips"][0]["version"], json!("4"));
        }
        assert_eq!(
            r["interfaces"][1].get("mtu").is_some(),
            *v == "1.1.0",
            "interfaces[].mtu is 1.1.0-only ({v}): {r}"
        );
        let host_mac = r["interfaces"][0]["mac"].as_str().unwrap_or_default();
        assert_eq!(host_mac.len(), 17, "host MAC in the result ({v}): {r}");
        assert!(r["interfaces"][0].get("sandbox").is_none());
        assert_eq!(r["interfaces"][1]["sandbox"], json!(p));

        let chk = cni(
            &h1.netns,
            "CHECK",
            &env,
            &with(c.clone(), "prevResult", r.clone()),
        );
        if vxmesh_at_least(v, "0.4.0") {
            assert_eq!(chk.code, 0, "CHECK {v}: {} {}", chk.json, chk.stderr);
        } else {
            assert_eq!(
                chk.err_code(),
                json!(1),
                "CHECK {v} is not defined: {}",
                chk.json
            );
        }
        // DEL as a runtime sends it after the container died: no netns, no prevResult.
        let del_env = [("CNI_CONTAINERID", id.as_str()), ("CNI_IFNAME", "eth0")];
        let del = cni(&h1.netns, "DEL", &del_env, &c.to_string());
        assert_eq!(del.code, 0, "DEL {v}: {}", del.json);
        assert!(!host_veth_exists(&h1.netns, &id, "eth0"));
        assert!(!holders(&h1.state_dir).contains(&id));
        let del = cni(&h1.netns, "DEL", &del_env, &c.to_string());
        assert_eq!(del.code, 0, "repeated DEL {v}: {}", del.json);
    }
}

fn vxmesh_at_least(v: &str, min: &str) -> bool {
    let pos = |x: &str| VERSIONS.iter().position(|s| *s == x).unwrap();
    pos(v) >= pos(min)
}

/// Chained after a plugin that added IPv6 and another interface, and with
/// an IPv6 address on our own interface: ADD keeps them first and CHECK
/// passes, in every version with CHECK (issue 18 finding 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_a_dual_stack_chain() {
    let s = spec("kc", 1, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    for (i, v) in ["1.1.0", "1.0.0", "0.4.0"].iter().enumerate() {
        let cname = format!("vxm-{}-c{i}", lab.info.name);
        let _g = NetnsGuard::create(&cname).unwrap();
        let p = netns_path(&cname);
        let id = format!("chain{i}");
        let env = container_env(&id, &p, "eth0");
        let mut prev = json!({
            "cniVersion": v,
            "interfaces": [{"name": "net1", "sandbox": p}],
            "ips": [{"address": "fd00::2/64", "interface": 0}, {"address": "10.99.0.2/24", "gateway": "10.99.0.1", "interface": 0}],
            "routes": [{"dst": "::/0", "gw": "fd00::1"}, {"dst": "10.98.0.0/16", "gw": "10.99.0.1"}],
            "dns": {},
        });
        if v.starts_with("0.") {
            prev["ips"][0]["version"] = json!("6");
            prev["ips"][1]["version"] = json!("4");
        }
        let c = conf(v, "overlay", &sd);
        let add = cni(
            &h1.netns,
            "ADD",
            &env,
            &with(c.clone(), "prevResult", prev.clone()),
        );
        assert_eq!(add.code, 0, "chained ADD {v}: {} {}", add.json, add.stderr);
        let mut r = add.json.clone();
        assert_eq!(r["interfaces"][0]["name"], json!("net1"));
        assert_eq!(r["ips"][0]["address"], json!("fd00::2/64"));
        assert_eq!(r["ips"][2]["interface"], json!(2), "ours re-indexed: {r}");
        // Another plugin also gave our eth0 an IPv6 address.
        let mut v6 = json!({"address": "fd01::5/64", "interface": 2});
        if v.starts_with("0.") {
            v6["version"] = json!("6");
        }
        r["ips"].as_array_mut().unwrap().push(v6);
        let chk = cni(
            &h1.netns,
            "CHECK",
            &env,
            &with(c.clone(), "prevResult", r.clone()),
        );
        assert_eq!(chk.code, 0, "CHECK {v} in a dual-stack chain: {}", chk.json);
        // Still a real check: our address gone is noticed.
        let ours = r["ips"][2]["address"].as_str().unwrap().to_string();
        ip(&cname, &["addr", "del", &ours, "dev", "eth0"]);
        let chk = cni(
            &h1.netns,
            "CHECK",
            &env,
            &with(c.clone(), "prevResult", r.clone()),
        );
        assert_eq!(chk.code, 1, "CHECK {v} without our address: {}", chk.json);
        let del = cni(&h1.netns, "DEL", &env, &c.to_string());
        assert_eq!(del.code, 0, "{}", del.json);
    }
}

/// A repeated ADD for the same container and interface is refused and
/// leaves the working attachment as it was (finding 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_add_leaves_the_attachment() {
    let s = spec("ka", 1, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let cname = format!("vxm-{}-ra", lab.info.name);
    let _g = NetnsGuard::create(&cname).unwrap();
    let p = netns_path(&cname);
    let env = container_env("again", &p, "eth0");
    let c = conf("1.1.0", "overlay", &sd);
    let add = cni(&h1.netns, "ADD", &env, &c.to_string());
    assert_eq!(add.code, 0, "{}", add.json);
    let before = addresses_in(&cname, "eth0");
    for stdin in [
        c.to_string(),
        with(c.clone(), "prevResult", add.json.clone()),
    ] {
        let again = cni(&h1.netns, "ADD", &env, &stdin);
        assert_ne!(again.code, 0, "a repeated ADD must not succeed silently");
        assert!(
            host_veth_exists(&h1.netns, "again", "eth0"),
            "repeated ADD deleted the host veth"
        );
        assert!(
            holders(&h1.state_dir).contains(&"again".to_string()),
            "repeated ADD released the address"
        );
        assert_eq!(addresses_in(&cname, "eth0"), before);
    }
    let chk = cni(
        &h1.netns,
        "CHECK",
        &env,
        &with(c.clone(), "prevResult", add.json.clone()),
    );
    assert_eq!(chk.code, 0, "CHECK after a repeated ADD: {}", chk.json);
    assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
}

/// CHECK looks at the host veth, its bridge and the agent (finding 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_looks_at_host_veth_bridge_and_agent() {
    let s = spec("kh", 1, 0, Mode::Routed, 1);
    let mut lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let cname = format!("vxm-{}-hb", lab.info.name);
    let _g = NetnsGuard::create(&cname).unwrap();
    let p = netns_path(&cname);
    let env = container_env("hostside", &p, "eth0");
    let c = conf("1.1.0", "overlay", &sd);
    let add = cni(&h1.netns, "ADD", &env, &c.to_string());
    assert_eq!(add.code, 0, "{}", add.json);
    let check = || {
        cni(
            &h1.netns,
            "CHECK",
            &env,
            &with(c.clone(), "prevResult", add.json.clone()),
        )
    };
    assert_eq!(check().code, 0);
    // Stopped, the agent cannot put the veth back on its bridge meanwhile.
    lab.stop_agent("host1", Signal::SIGTERM).unwrap();
    let veth = vxmesh::attach::host_veth_name("demo", "hostside", "eth0");
    ip(&h1.netns, &["link", "set", &veth, "nomaster"]);
    let chk = check();
    assert_eq!(
        chk.code, 1,
        "CHECK with the host veth off its bridge: {}",
        chk.json
    );
    assert!(
        chk.json["msg"].as_str().unwrap().contains(&veth),
        "{}",
        chk.json
    );
    ip(&h1.netns, &["link", "set", &veth, "master", "vxm-br0"]);
    let chk = check();
    assert_eq!(chk.code, 1, "CHECK with the agent stopped: {}", chk.json);
    assert!(
        chk.json["msg"].as_str().unwrap().contains("agent"),
        "{}",
        chk.json
    );
    lab.start_agent("host1").unwrap();
    lab.wait_agent_ready("host1", Duration::from_secs(10))
        .await
        .unwrap();
    // The restarted agent converges within a moment (it repairs within a second).
    let mut last = Value::Null;
    let passed = wait_until(Duration::from_secs(5), || {
        let chk = check();
        last = chk.json;
        chk.code == 0
    })
    .await;
    assert!(passed.is_some(), "CHECK with the agent back: {last}");
    assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
}

/// Logs reach stderr: quiet by default, errors always, more from
/// VXMESH_CNI_LOG or the configuration's logLevel (finding 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_reach_stderr() {
    let s = spec("kl", 1, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let c = conf("1.1.0", "overlay", &sd);
    let cname = format!("vxm-{}-log", lab.info.name);
    let _g = NetnsGuard::create(&cname).unwrap();
    let p = netns_path(&cname);
    let env = container_env("log", &p, "eth0");
    let mut bad = env.to_vec();
    bad.push(("CNI_ARGS", "IP=banana"));
    let o = cni(&h1.netns, "ADD", &bad, &c.to_string());
    assert_eq!(o.err_code(), json!(7));
    assert!(
        o.stderr.contains("banana"),
        "errors are logged: {:?}",
        o.stderr
    );
    let add = cni(&h1.netns, "ADD", &env, &c.to_string());
    assert_eq!(add.code, 0, "{}", add.json);
    assert!(add.stderr.is_empty(), "quiet by default: {}", add.stderr);
    assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
    let mut loud = env.to_vec();
    loud.push(("VXMESH_CNI_LOG", "info"));
    let add = cni(&h1.netns, "ADD", &loud, &c.to_string());
    assert_eq!(add.code, 0, "{}", add.json);
    assert!(
        add.stderr.contains("attached log/eth0"),
        "info from the environment: {}",
        add.stderr
    );
    assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
    let add = cni(
        &h1.netns,
        "ADD",
        &env,
        &with(c.clone(), "logLevel", json!("info")),
    );
    assert_eq!(add.code, 0, "{}", add.json);
    assert!(
        add.stderr.contains("attached log/eth0"),
        "info from logLevel: {}",
        add.stderr
    );
    assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
}

/// Every error code the plugin gives, and the small items of finding 7
/// (code 2 names the value, STATUS without network is 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code() {
    let s = spec("ke", 1, 0, Mode::Routed, 1);
    let mut lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let c = conf("1.1.0", "overlay", &sd);
    let cname = format!("vxm-{}-codes", lab.info.name);
    let _g = NetnsGuard::create(&cname).unwrap();
    let p = netns_path(&cname);
    let full = container_env("codes", &p, "eth0");
    let o = cni(
        &h1.netns,
        "ADD",
        &full,
        &conf("0.2.0", "overlay", &sd).to_string(),
    );
    assert_eq!(o.err_code(), json!(1), "{}", o.json);
    let o = cni(
        &h1.netns,
        "GC",
        &[],
        &conf("1.0.0", "overlay", &sd).to_string(),
    );
    assert_eq!(o.err_code(), json!(1), "GC needs 1.1.0: {}", o.json);
    let o = cni(
        &h1.netns,
        "STATUS",
        &[],
        &conf("1.0.0", "overlay", &sd).to_string(),
    );
    assert_eq!(o.err_code(), json!(1), "STATUS needs 1.1.0: {}", o.json);
    let mut env = full.to_vec();
    env.push(("CNI_ARGS", "K8S_POD_NAME=web"));
    let o = cni(&h1.netns, "ADD", &env, &c.to_string());
    assert_eq!(o.err_code(), json!(2), "{}", o.json);
    let msg = o.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("K8S_POD_NAME") && msg.contains("web"),
        "key and value: {msg}"
    );
    let gone = container_env("codes", "/run/netns/vxm-nonexistent-ns", "eth0");
    let o = cni(&h1.netns, "ADD", &gone, &c.to_string());
    assert_eq!(o.err_code(), json!(3), "{}", o.json);
    let o = cni(&h1.netns, "ADD", &full[1..], &c.to_string());
    assert_eq!(o.err_code(), json!(4), "{}", o.json);
    let o = cni(&h1.netns, "ADD", &full, "{\"cniVersion\": ");
    assert_eq!(o.err_code(), json!(6), "{}", o.json);
    let mut bad = c.clone();
    bad["network"] = json!("nosuch");
    let o = cni(&h1.netns, "ADD", &full, &bad.to_string());
    assert_eq!(o.err_code(), json!(7), "{}", o.json);
    assert_eq!(o.json["cniVersion"], json!("1.1.0"));
    let mut nonet = c.clone();
    nonet.as_object_mut().unwrap().remove("network");
    let o = cni(&h1.netns, "STATUS", &[], &nonet.to_string());
    assert_eq!(o.err_code(), json!(7), "STATUS without network: {}", o.json);
    let o = cni(&h1.netns, "STATUS", &[], &c.to_string());
    assert_eq!(o.code, 0, "{}", o.json);
    lab.stop_agent("host1", Signal::SIGTERM).unwrap();
    let o = cni(&h1.netns, "STATUS", &[], &c.to_string());
    assert_eq!(o.err_code(), json!(50), "{}", o.json);
    lab.start_agent("host1").unwrap();
    lab.wait_agent_ready("host1", Duration::from_secs(10))
        .await
        .unwrap();
    // Error 5: an ADD the kernel refuses (a repeated one) is an I/O failure.
    let add = cni(&h1.netns, "ADD", &full, &c.to_string());
    assert_eq!(add.code, 0, "{}", add.json);
    let o = cni(&h1.netns, "ADD", &full, &c.to_string());
    assert_eq!(o.err_code(), json!(5), "{}", o.json);
    assert!(
        o.json["details"]
            .as_str()
            .unwrap()
            .contains("already attached"),
        "{}",
        o.json
    );
    assert_eq!(cni(&h1.netns, "DEL", &full, &c.to_string()).code, 0);
}
