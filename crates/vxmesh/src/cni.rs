//! The CNI plugin (spec 1.0.0 and 1.1.0): `vxmesh` run with `CNI_COMMAND` set.
//!
//! Network configuration:
//! ```json
//! { "cniVersion": "1.1.0", "name": "overlay", "type": "vxmesh",
//!   "network": "demo", "stateDir": "/run/vxmesh", "mtu": 1400 }
//! ```
//! `network` names a network the node's agent serves; the agent publishes it
//! in `stateDir`. ADD/DEL share the attach code of `vxmesh attach` and the
//! lab, so one allocator (under a file lock) serves all of them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::attach::{self, AttachRequest};
use crate::dataplane::kernel::Netlink;
use crate::dataplane::netns::Netns;
use crate::ipam::Ipam;
use crate::state;

pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// CNI error codes (spec section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
    pub fn to_json(&self, version: &str) -> Value {
        json!({ "cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

type CniResult<T> = Result<T, CniError>;

/// The plugin's network configuration (unknown keys are allowed: runtimes add their own).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    pub network: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub mtu: Option<u32>,
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Capability arguments from the runtime (`ips` is honoured).
    pub runtime_config: Option<Value>,
}

/// The address a runtime asks for: `runtimeConfig.ips` (the `ips`
/// capability) or `IP=` in CNI_ARGS. CNI_ARGS keys other than `IP` and
/// `IgnoreUnknown` are an error unless `IgnoreUnknown=1|true`.
pub fn requested_ip(env: &Env, conf: &NetConf) -> CniResult<Option<std::net::Ipv4Addr>> {
    let bad = |what: &str, v: &str| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("{what} '{v}' is not an IPv4 address"),
            "use A.B.C.D or A.B.C.D/LEN",
        )
    };
    let parse = |what: &str, v: &str| -> CniResult<std::net::Ipv4Addr> {
        let host = v.split('/').next().unwrap_or(v);
        host.parse().map_err(|_| bad(what, v))
    };
    if let Some(ips) = conf
        .runtime_config
        .as_ref()
        .and_then(|r| r.get("ips"))
        .and_then(Value::as_array)
        && let Some(first) = ips.iter().filter_map(Value::as_str).next()
    {
        return parse("runtimeConfig.ips", first).map(Some);
    }
    let Some(args) = env.args.as_deref() else {
        return Ok(None);
    };
    let pairs: Vec<(&str, &str)> = args
        .split(';')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let ignore_unknown = pairs
        .iter()
        .any(|(k, v)| *k == "IgnoreUnknown" && (*v == "1" || v.eq_ignore_ascii_case("true")));
    let mut ip = None;
    for (k, v) in pairs {
        match k {
            "IP" => ip = Some(parse("CNI_ARGS IP", v)?),
            "IgnoreUnknown" => {}
            other if !ignore_unknown => {
                return Err(CniError::new(
                    code::UNSUPPORTED_FIELD,
                    format!("unknown CNI_ARGS key '{other}'"),
                    "vxmesh understands IP=; add IgnoreUnknown=1 to pass other keys",
                ));
            }
            _ => {}
        }
    }
    Ok(ip)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The CNI_* environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    pub fn from_vars(vars: &HashMap<String, String>) -> Self {
        let get = |k: &str| vars.get(k).filter(|v| !v.is_empty()).cloned();
        Env {
            command: vars.get("CNI_COMMAND").cloned().unwrap_or_default(),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    fn require<'a>(&self, v: &'a Option<String>, name: &str) -> CniResult<&'a str> {
        v.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set"),
                format!("the runtime must set {name} for {}", self.command),
            )
        })
    }
}

fn version_ok(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

fn at_least_1_1(v: &str) -> bool {
    v == "1.1.0"
}

/// Parse and check the configuration on stdin.
pub fn parse_conf(stdin: &[u8]) -> CniResult<NetConf> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    if !version_ok(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {} is not supported", conf.cni_version),
            format!("vxmesh supports {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if conf.plugin_type != "vxmesh" {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("type is '{}', not 'vxmesh'", conf.plugin_type),
            "",
        ));
    }
    if let Some(m) = conf.mtu
        && !(crate::config::MIN_MTU..=crate::config::MAX_MTU).contains(&m)
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("mtu {m} is out of range"),
            format!("use {}-{}", crate::config::MIN_MTU, crate::config::MAX_MTU),
        ));
    }
    Ok(conf)
}

impl NetConf {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(state::DEFAULT_STATE_DIR))
    }
    fn network(&self) -> CniResult<&str> {
        self.network.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "\"network\" is missing",
                "set \"network\" to a network the node's vxmesh agent serves",
            )
        })
    }
    /// The served network, or error 7 naming the known ones.
    fn served(&self) -> CniResult<state::ServedNetwork> {
        let net = self.network()?;
        let dir = self.state_dir();
        state::read_network(&dir, net).map_err(|e| {
            let known = state::list_networks(&dir);
            CniError::new(
                code::INVALID_CONFIG,
                format!("network '{net}' is not served on this node"),
                format!("{e:#}; served networks: [{}]", known.join(", ")),
            )
        })
    }
}

fn io_err(e: impl std::fmt::Display, what: &str) -> CniError {
    CniError::new(code::IO_FAILURE, what.to_string(), format!("{e:#}"))
}

fn open_netns(path: &str) -> CniResult<Netns> {
    Netns::open_path(Path::new(path)).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("network namespace {path} does not exist"),
            format!("{e:#}"),
        )
    })
}

/// Run one plugin invocation. Returns the JSON to print on success.
pub async fn run(env: &Env, stdin: &[u8]) -> CniResult<Option<Value>> {
    if env.command == "VERSION" {
        return Ok(Some(
            json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS }),
        ));
    }
    let conf = parse_conf(stdin)?;
    match env.command.as_str() {
        "ADD" => add(env, &conf).await.map(Some),
        "DEL" => del(env, &conf).await.map(|_| None),
        "CHECK" => check(env, &conf).await.map(|_| None),
        "STATUS" => status(&conf).map(|_| None),
        "GC" => gc(&conf).await.map(|_| None),
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND '{other}'"),
            "use ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

async fn add(env: &Env, conf: &NetConf) -> CniResult<Value> {
    let id = env.require(&env.container_id, "CNI_CONTAINERID")?;
    let netns_path = env.require(&env.netns, "CNI_NETNS")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    let served = conf.served()?;
    let want_ip = requested_ip(env, conf)?;
    let ns = open_netns(netns_path)?;
    let a = attach::attach(&AttachRequest {
        state_dir: &conf.state_dir(),
        network: &served.state.network,
        container_id: id,
        ifname,
        host_ns: None,
        container_ns: &ns,
        ip: want_ip,
        mtu: conf.mtu,
    })
    .await
    .map_err(|e| io_err(e, "attach failed"))?;
    let mut result = json!({
        "cniVersion": conf.cni_version,
        "interfaces": [
            { "name": a.host_veth, "mac": host_mac(&a.host_veth).await.unwrap_or_default() },
            { "name": a.ifname, "mac": a.mac.to_string(), "mtu": a.mtu, "sandbox": netns_path },
        ],
        "ips": [ { "address": a.ip.to_string(), "interface": 1 } ],
        "routes": [],
        "dns": {},
    });
    if let Some(gw) = a.gateway {
        result["ips"][0]["gateway"] = json!(gw.to_string());
        result["routes"] = json!([{ "dst": "0.0.0.0/0", "gw": gw.to_string() }]);
    } else {
        result["routes"] = json!([{ "dst": "0.0.0.0/0" }]);
    }
    // Chained after another plugin: keep what it reported.
    if let Some(prev) = &conf.prev_result {
        merge_prev(&mut result, prev);
    }
    Ok(result)
}

async fn host_mac(name: &str) -> Option<String> {
    let nl = Netlink::connect().await.ok()?;
    let links = nl.list_links().await.ok()?;
    links
        .into_iter()
        .find(|l| l.name == name)
        .and_then(|l| l.mac)
        .map(|m| m.to_string())
}

/// Put the previous plugin's interfaces/ips/routes first, re-indexing ours.
pub fn merge_prev(result: &mut Value, prev: &Value) {
    let prev_ifaces = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let offset = prev_ifaces.len() as u64;
    let mut ifaces = prev_ifaces;
    ifaces.extend(result["interfaces"].as_array().cloned().unwrap_or_default());
    let mut ips = prev
        .get("ips")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for mut ip in result["ips"].as_array().cloned().unwrap_or_default() {
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            ip["interface"] = json!(i + offset);
        }
        ips.push(ip);
    }
    let mut routes = prev
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    routes.extend(result["routes"].as_array().cloned().unwrap_or_default());
    result["interfaces"] = json!(ifaces);
    result["ips"] = json!(ips);
    result["routes"] = json!(routes);
    if let Some(dns) = prev.get("dns") {
        result["dns"] = dns.clone();
    }
}

async fn del(env: &Env, conf: &NetConf) -> CniResult<()> {
    let id = env.require(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    // DEL must succeed even if the network is gone from the node's state.
    let net = conf.network()?;
    attach::detach(&conf.state_dir(), net, id, ifname, None)
        .await
        .map_err(|e| io_err(e, "detach failed"))?;
    Ok(())
}

async fn check(env: &Env, conf: &NetConf) -> CniResult<()> {
    let id = env.require(&env.container_id, "CNI_CONTAINERID")?;
    let netns_path = env.require(&env.netns, "CNI_NETNS")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    let served = conf.served()?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
            "the runtime must pass the ADD result",
        )
    })?;
    let ns = open_netns(netns_path)?;
    let fail = |m: String| CniError::new(code::IO_FAILURE, m, format!("container {id}"));
    // The allocation is still ours.
    let owner = crate::ipam::Owner {
        container_id: id.to_string(),
        ifname: ifname.to_string(),
    };
    let held = Ipam::new(&conf.state_dir(), &served.state.network)
        .find(&owner)
        .map_err(|e| io_err(e, "read allocations"))?;
    let held = held.ok_or_else(|| fail(format!("no address is allocated to {id}/{ifname}")))?;
    // The interface, its addresses and routes match prevResult.
    let nl = Netlink::connect_in(&ns)
        .await
        .map_err(|e| io_err(e, "netlink in container"))?;
    let facts = nl
        .interface_facts(ifname)
        .await
        .map_err(|e| io_err(e, "inspect container interface"))?;
    let facts =
        facts.ok_or_else(|| fail(format!("interface {ifname} is missing in {netns_path}")))?;
    if !facts.up {
        return Err(fail(format!("interface {ifname} is down")));
    }
    let want = prev_expectations(prev)?;
    for net in want.addresses {
        if net.addr() == held && !facts.addresses.contains(&net) {
            return Err(fail(format!("address {net} is missing on {ifname}")));
        }
    }
    for (dst, gw) in want.routes {
        if !facts
            .routes
            .iter()
            .any(|(d, g)| *d == dst && (gw.is_none() || *g == gw))
        {
            return Err(fail(format!("route {dst} is missing in the container")));
        }
    }
    Ok(())
}

/// What CHECK verifies from a prevResult: its IPv4 addresses and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrevExpectations {
    pub addresses: Vec<ipnet::Ipv4Net>,
    /// (destination, gateway if one is given and is IPv4).
    pub routes: Vec<(ipnet::Ipv4Net, Option<std::net::Ipv4Addr>)>,
}

/// Read a prevResult the way CHECK does: every `ips[].address` must be an
/// IPv4 CIDR (error 6 otherwise); routes that are not IPv4 are skipped.
pub fn prev_expectations(prev: &Value) -> CniResult<PrevExpectations> {
    let mut out = PrevExpectations::default();
    for ip in prev
        .get("ips")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let Some(addr) = ip.get("address").and_then(Value::as_str) else {
            continue;
        };
        let net: ipnet::Ipv4Net = addr.parse().map_err(|_| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("bad address {addr} in prevResult"),
                "",
            )
        })?;
        out.addresses.push(net);
    }
    for r in prev
        .get("routes")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let dst = r.get("dst").and_then(Value::as_str).unwrap_or_default();
        let gw = r
            .get("gw")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        let Ok(dst) = dst.parse::<ipnet::Ipv4Net>() else {
            continue;
        };
        out.routes.push((dst, gw));
    }
    Ok(out)
}

fn status(conf: &NetConf) -> CniResult<()> {
    if !at_least_1_1(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "STATUS needs cniVersion 1.1.0",
            "",
        ));
    }
    let dir = conf.state_dir();
    conf.served()
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg, e.details))?;
    if !state::agent_running(&dir) {
        return Err(CniError::new(
            code::NOT_AVAILABLE,
            "the vxmesh agent is not running",
            format!("no agent holds {}", dir.join("agent.lock").display()),
        ));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> CniResult<()> {
    if !at_least_1_1(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "GC needs cniVersion 1.1.0",
            "",
        ));
    }
    let net = conf.network()?;
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let keep = |id: &str, ifname: &str| {
        valid
            .iter()
            .any(|v| v.container_id == id && v.ifname == ifname)
    };
    let dir = conf.state_dir();
    let nl = Netlink::connect().await.map_err(|e| io_err(e, "netlink"))?;
    // Veths first, addresses after, as detach does: the agent restores an
    // allocation whose veth still exists (a deleted state dir), so an
    // address must never be released while its veth is there.
    // Host veths of this network whose attachment is not valid (including
    // ones whose allocation was already lost).
    let links = nl.list_links().await.map_err(|e| io_err(e, "list links"))?;
    let prefix = format!("{}veth:{net}:", crate::model::OWNER_ALIAS_PREFIX);
    for l in links {
        let Some(rest) = l.alias.as_deref().and_then(|a| a.strip_prefix(&prefix)) else {
            continue;
        };
        let (ifname, id) = rest.split_once(':').unwrap_or((rest, ""));
        if !keep(id, ifname) {
            nl.delete_link(&l.name)
                .await
                .map_err(|e| io_err(e, "delete stale veth"))?;
        }
    }
    let released = Ipam::new(&dir, net)
        .retain(|a| keep(&a.owner.container_id, &a.owner.ifname))
        .map_err(|e| io_err(e, "release stale allocations"))?;
    for a in released {
        let _ = nl
            .delete_link(&attach::host_veth_name(
                net,
                &a.owner.container_id,
                &a.owner.ifname,
            ))
            .await;
    }
    Ok(())
}

/// The CNI version to answer in: the configuration's `cniVersion` when it
/// is one vxmesh speaks, else 1.1.0 (also for stdin that is not JSON).
///
/// Decoded like [`NetConf`] (other keys ignored, not validated), so that a
/// configuration the plugin accepts is always answered in its own version.
pub fn reply_version(stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Version {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<Version>(stdin)
        .ok()
        .and_then(|v| v.cni_version)
        .filter(|v| version_ok(v))
        .unwrap_or_else(|| "1.1.0".to_string())
}

/// Entry point from `main` when `CNI_COMMAND` is set. Prints the result or
/// the error JSON on stdout and returns the exit code.
pub fn main() -> i32 {
    let vars: HashMap<String, String> = std::env::vars().collect();
    let env = Env::from_vars(&vars);
    let mut stdin = Vec::new();
    if env.command != "VERSION"
        && let Err(e) = std::io::stdin().read_to_end(&mut stdin)
    {
        let err = CniError::new(code::IO_FAILURE, "cannot read stdin", e.to_string());
        println!("{}", err.to_json("1.1.0"));
        return 1;
    }
    let version = reply_version(&stdin);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!(
                "{}",
                CniError::new(code::IO_FAILURE, "cannot start runtime", e.to_string())
                    .to_json(&version)
            );
            return 1;
        }
    };
    match rt.block_on(run(&env, &stdin)) {
        Ok(Some(v)) => {
            println!("{v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            println!("{}", e.to_json(&version));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_have_code_6() {
        assert_eq!(
            parse_conf(b"{not json").unwrap_err().code,
            code::DECODE_FAILURE
        );
    }

    #[test]
    fn unsupported_version_has_code_1() {
        let e =
            parse_conf(br#"{"cniVersion":"0.4.0","name":"n","type":"vxmesh","network":"demo"}"#)
                .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn wrong_type_or_mtu_has_code_7() {
        let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","type":"vxmesh","mtu":10}"#)
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn errors_answer_in_the_configuration_version() {
        assert_eq!(reply_version(b"{not json"), "1.1.0");
        assert_eq!(reply_version(br#"{"cniVersion":"0.4.0"}"#), "1.1.0");
        // Found by fuzzing: an unknown key holding invalid UTF-8 is skipped
        // by the configuration decoder, so the version must still be read.
        let conf = b"{\"cniVersion\":\"1.0.0\",\"name\":\"n\",\"type\":\"vxmesh\",\"x\":\"\xff\"}";
        assert!(parse_conf(conf).is_ok());
        assert_eq!(reply_version(conf), "1.0.0");
    }

    fn conf_with(extra: &str) -> NetConf {
        let text = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"vxmesh","network":"demo"{extra}}}"#
        );
        parse_conf(text.as_bytes()).unwrap()
    }

    #[test]
    fn requested_ip_from_args_and_runtime_config() {
        let mut env = Env {
            command: "ADD".into(),
            ..Default::default()
        };
        assert_eq!(requested_ip(&env, &conf_with("")).unwrap(), None);
        env.args = Some("IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.10.0.5".into());
        assert_eq!(
            requested_ip(&env, &conf_with("")).unwrap(),
            Some("10.10.0.5".parse().unwrap())
        );
        env.args = Some("K8S_POD_NAME=x".into());
        assert_eq!(
            requested_ip(&env, &conf_with("")).unwrap_err().code,
            code::UNSUPPORTED_FIELD
        );
        env.args = Some("IP=banana".into());
        assert_eq!(
            requested_ip(&env, &conf_with("")).unwrap_err().code,
            code::INVALID_CONFIG
        );
        env.args = None;
        let c = conf_with(r#","runtimeConfig":{"ips":["10.10.0.9/22"]}"#);
        assert_eq!(
            requested_ip(&env, &c).unwrap(),
            Some("10.10.0.9".parse().unwrap())
        );
    }

    #[test]
    fn prev_result_is_kept_first() {
        let mut ours = json!({"interfaces":[{"name":"h"},{"name":"eth0"}],"ips":[{"address":"10.0.0.2/24","interface":1}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}});
        let prev = json!({"interfaces":[{"name":"lo0"}],"ips":[{"address":"192.0.2.1/32","interface":0}],"routes":[],"dns":{"nameservers":["192.0.2.53"]}});
        merge_prev(&mut ours, &prev);
        assert_eq!(ours["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(ours["ips"][1]["interface"], json!(2));
        assert_eq!(ours["dns"]["nameservers"][0], json!("192.0.2.53"));
    }
}
