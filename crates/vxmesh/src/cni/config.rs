//! The plugin's input: the network configuration on stdin (and the
//! address a runtime asks for through it or CNI_ARGS).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::env::Env;
use super::error::{CniError, CniResult, Code};
use crate::model::Mac;
use crate::state;

/// The CNI versions vxmesh speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The plugin's network configuration (unknown keys are allowed: runtimes add their own).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    /// The CNI network name (the runtime's name for this configuration;
    /// GC only collects attachments made under it).
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    pub network: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub mtu: Option<u32>,
    pub prev_result: Option<Value>,
    /// GC's list of attachments still in use, under the 1.1.0 key.
    #[serde(rename = "cni.dev/attachments")]
    pub attachments: Option<Vec<ValidAttachment>>,
    /// The same list under the key libcni also sends (1.2.3 and later).
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Capability arguments from the runtime (`ips` and `mac` are honoured).
    pub runtime_config: Option<Value>,
    /// `args.cni.ips` and `args.cni.mac` (CONVENTIONS.md) are honoured.
    pub args: Option<Value>,
    /// The plugin's log level on stderr (`error`, `warn`, `info`, `debug`,
    /// `trace`); the `VXMESH_CNI_LOG` variable wins over it.
    pub log_level: Option<String>,
}

/// The CNI_ARGS pairs (`K=V;K=V`), checked: keys other than `IP`, `MAC`
/// and `IgnoreUnknown` are error 2 unless `IgnoreUnknown=1|true`.
fn cni_args(env: &Env) -> CniResult<Vec<(&str, &str)>> {
    let Some(args) = env.args.as_deref() else {
        return Ok(Vec::new());
    };
    let pairs: Vec<(&str, &str)> = args
        .split(';')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let ignore_unknown = pairs
        .iter()
        .any(|(k, v)| *k == "IgnoreUnknown" && (*v == "1" || v.eq_ignore_ascii_case("true")));
    if !ignore_unknown
        && let Some((k, v)) = pairs
            .iter()
            .find(|(k, _)| !matches!(*k, "IP" | "MAC" | "IgnoreUnknown"))
    {
        return Err(CniError::new(
            Code::UnsupportedField,
            format!("unknown CNI_ARGS key '{k}' (value '{v}')"),
            "vxmesh understands IP= and MAC=; add IgnoreUnknown=1 to pass other keys",
        ));
    }
    Ok(pairs)
}

/// The strings of `v[key]` if it is a list of strings (other shapes: error 7).
fn string_list(v: Option<&Value>, what: &str) -> CniResult<Vec<String>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    CniError::new(
                        Code::InvalidConfig,
                        format!("{what} holds {i}, not an address string"),
                        "",
                    )
                })
            })
            .collect(),
        Some(other) => Err(CniError::new(
            Code::InvalidConfig,
            format!("{what} is {other}, not a list of addresses"),
            "",
        )),
    }
}

/// The address a runtime asks for, from every place the conventions name:
/// `runtimeConfig.ips` (the `ips` capability), `args.cni.ips` and `IP=`
/// in CNI_ARGS (a comma-separated list). vxmesh gives an interface one
/// IPv4 address: that is the IPv4 entry of these lists; two different IPv4
/// addresses are refused (error 7). IPv6 entries are for another plugin of
/// a dual-stack chain (the runtime gives every plugin the same lists) and
/// are passed over, with a note in the log.
pub fn requested_ip(env: &Env, conf: &NetConf) -> CniResult<Option<std::net::Ipv4Addr>> {
    let mut asked: Vec<(&str, String)> = Vec::new();
    for ip in string_list(
        conf.runtime_config.as_ref().and_then(|r| r.get("ips")),
        "runtimeConfig.ips",
    )? {
        asked.push(("runtimeConfig.ips", ip));
    }
    for ip in string_list(
        conf.args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("ips")),
        "args.cni.ips",
    )? {
        asked.push(("args.cni.ips", ip));
    }
    for (k, v) in cni_args(env)? {
        if k == "IP" {
            for ip in v.split(',').filter(|s| !s.is_empty()) {
                asked.push(("CNI_ARGS IP", ip.to_string()));
            }
        }
    }
    let mut chosen: Option<std::net::Ipv4Addr> = None;
    for (what, v) in &asked {
        let host = v.split('/').next().unwrap_or(v);
        let ip: std::net::IpAddr = host.parse().map_err(|_| {
            CniError::new(
                Code::InvalidConfig,
                format!("{what} '{v}' is not an IPv4 address"),
                "use A.B.C.D or A.B.C.D/LEN",
            )
        })?;
        let std::net::IpAddr::V4(ip) = ip else {
            tracing::info!("{what} '{v}' is IPv6: left to another plugin of the chain");
            continue;
        };
        match chosen {
            Some(c) if c != ip => {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!("two IPv4 addresses requested: {c} and {ip} ({what})"),
                    "vxmesh gives an interface one IPv4 address",
                ));
            }
            _ => chosen = Some(ip),
        }
    }
    Ok(chosen)
}

/// The MAC a runtime asks for: `runtimeConfig.mac` (the `mac`
/// capability), `args.cni.mac` or `MAC=` in CNI_ARGS. It must be a
/// unicast address; two different requests are error 7.
pub fn requested_mac(env: &Env, conf: &NetConf) -> CniResult<Option<Mac>> {
    let mut asked: Vec<(&str, String)> = Vec::new();
    let from_json = |v: Option<&Value>, what: &'static str| -> CniResult<Option<(&str, String)>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some((what, s.clone()))),
            Some(other) => Err(CniError::new(
                Code::InvalidConfig,
                format!("{what} is {other}, not a MAC address string"),
                "",
            )),
        }
    };
    asked.extend(from_json(
        conf.runtime_config.as_ref().and_then(|r| r.get("mac")),
        "runtimeConfig.mac",
    )?);
    asked.extend(from_json(
        conf.args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("mac")),
        "args.cni.mac",
    )?);
    for (k, v) in cni_args(env)? {
        if k == "MAC" {
            asked.push(("CNI_ARGS MAC", v.to_string()));
        }
    }
    let mut chosen: Option<Mac> = None;
    for (what, v) in &asked {
        let mac: Mac = v.to_ascii_lowercase().parse().map_err(|_| {
            CniError::new(
                Code::InvalidConfig,
                format!("{what} '{v}' is not a MAC address"),
                "use six hex octets, aa:bb:cc:dd:ee:ff",
            )
        })?;
        if mac.octets()[0] & 1 == 1 {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("{what} '{v}' is a multicast address"),
                "an interface needs a unicast MAC (lowest bit of the first octet 0)",
            ));
        }
        match chosen {
            Some(c) if c != mac => {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!("two MAC addresses requested: {c} and {mac} ({what})"),
                    "",
                ));
            }
            _ => chosen = Some(mac),
        }
    }
    Ok(chosen)
}

/// One (container, interface) in GC's list of attachments still in use.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

pub(super) fn version_ok(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// Whether `v` is `min` or later (both supported versions).
pub(super) fn at_least(v: &str, min: &str) -> bool {
    let pos = |x: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == x);
    matches!((pos(v), pos(min)), (Some(a), Some(b)) if a >= b)
}

pub(super) fn at_least_1_1(v: &str) -> bool {
    at_least(v, "1.1.0")
}

/// Parse and check the configuration on stdin.
pub fn parse_conf(stdin: &[u8]) -> CniResult<NetConf> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            Code::DecodeFailure,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    if !version_ok(&conf.cni_version) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("CNI version {} is not supported", conf.cni_version),
            format!("vxmesh supports {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if conf.plugin_type != "vxmesh" {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("type is '{}', not 'vxmesh'", conf.plugin_type),
            "",
        ));
    }
    if let Some(m) = conf.mtu
        && !(crate::config::MIN_MTU..=crate::config::MAX_MTU).contains(&m)
    {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("mtu {m} is out of range"),
            format!("use {}-{}", crate::config::MIN_MTU, crate::config::MAX_MTU),
        ));
    }
    Ok(conf)
}

impl NetConf {
    /// GC's list of attachments in use: the entries under either key
    /// (both, when a runtime sends both). `None` when neither is given.
    pub fn gc_attachments(&self) -> Option<Vec<ValidAttachment>> {
        if self.attachments.is_none() && self.valid_attachments.is_none() {
            return None;
        }
        let mut all = self.attachments.clone().unwrap_or_default();
        for v in self.valid_attachments.iter().flatten() {
            if !all.contains(v) {
                all.push(v.clone());
            }
        }
        Some(all)
    }

    pub(super) fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(state::DEFAULT_STATE_DIR))
    }
    pub(super) fn network(&self) -> CniResult<&str> {
        self.network.as_deref().ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "\"network\" is missing",
                "set \"network\" to a network the node's vxmesh agent serves",
            )
        })
    }
    /// The served network, or error 7 naming the known ones.
    pub(super) fn served(&self) -> CniResult<state::ServedNetwork> {
        let net = self.network()?;
        let dir = self.state_dir();
        state::read_network(&dir, net).map_err(|e| {
            let known = state::list_networks(&dir);
            CniError::new(
                Code::InvalidConfig,
                format!("network '{net}' is not served on this node"),
                format!("{e:#}; served networks: [{}]", known.join(", ")),
            )
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_have_code_6() {
        assert_eq!(
            parse_conf(b"{not json").unwrap_err().code,
            Code::DecodeFailure
        );
    }

    #[test]
    fn unsupported_version_has_code_1() {
        let e =
            parse_conf(br#"{"cniVersion":"0.2.0","name":"n","type":"vxmesh","network":"demo"}"#)
                .unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        for v in SUPPORTED_VERSIONS {
            let text = format!(r#"{{"cniVersion":"{v}","name":"n","type":"vxmesh"}}"#);
            assert_eq!(parse_conf(text.as_bytes()).unwrap().cni_version, *v);
        }
        assert!(at_least("0.4.0", "0.4.0") && at_least("1.1.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0") && !at_least("1.0.0", "1.1.0"));
    }

    #[test]
    fn wrong_type_or_mtu_has_code_7() {
        let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","type":"vxmesh","mtu":10}"#)
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
    }

    #[test]
    fn errors_answer_in_the_configuration_version() {
        assert_eq!(reply_version(b"{not json"), "1.1.0");
        assert_eq!(reply_version(br#"{"cniVersion":"0.2.0"}"#), "1.1.0");
        assert_eq!(reply_version(br#"{"cniVersion":"0.3.1"}"#), "0.3.1");
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
            Code::UnsupportedField
        );
        env.args = Some("IP=banana".into());
        assert_eq!(
            requested_ip(&env, &conf_with("")).unwrap_err().code,
            Code::InvalidConfig
        );
        env.args = None;
        let c = conf_with(r#","runtimeConfig":{"ips":["10.10.0.9/22"]}"#);
        assert_eq!(
            requested_ip(&env, &c).unwrap(),
            Some("10.10.0.9".parse().unwrap())
        );
    }

    #[test]
    fn every_requested_address_is_honoured_or_refused() {
        let env = |args: &str| Env {
            command: "ADD".into(),
            args: Some(args.into()),
            ..Default::default()
        };
        let ip = |s: &str| Some(s.parse::<std::net::Ipv4Addr>().unwrap());
        let plain = conf_with("");
        // An IP= list: its IPv4 entry; two different IPv4 entries: 7.
        assert_eq!(
            requested_ip(&env("IP=10.10.0.5,10.10.0.5"), &plain).unwrap(),
            ip("10.10.0.5")
        );
        assert_eq!(
            requested_ip(&env("IP=fd00::5,10.10.0.5"), &plain).unwrap(),
            ip("10.10.0.5")
        );
        assert_eq!(requested_ip(&env("IP=fd00::5"), &plain).unwrap(), None);
        for bad in ["IP=10.10.0.5,10.10.0.6", "IP=banana", "IP=10.10.0.5,x"] {
            assert_eq!(
                requested_ip(&env(bad), &plain).unwrap_err().code,
                Code::InvalidConfig,
                "{bad}"
            );
        }
        // args.cni.ips (CONVENTIONS.md).
        let c = conf_with(r#","args":{"cni":{"ips":["10.10.0.7"]}}"#);
        assert_eq!(requested_ip(&Env::default(), &c).unwrap(), ip("10.10.0.7"));
        // The IPv4 entry of runtimeConfig.ips, wherever it is in the list.
        let c = conf_with(r#","runtimeConfig":{"ips":["fd00::9/64","10.10.0.9/22"]}"#);
        assert_eq!(requested_ip(&Env::default(), &c).unwrap(), ip("10.10.0.9"));
        let c = conf_with(r#","runtimeConfig":{"ips":["10.10.0.9/22","10.10.0.10/22"]}"#);
        assert_eq!(
            requested_ip(&Env::default(), &c).unwrap_err().code,
            Code::InvalidConfig
        );
        // Sources that agree are one request; sources that differ are 7.
        let c = conf_with(r#","runtimeConfig":{"ips":["10.10.0.9/22"]}"#);
        assert_eq!(
            requested_ip(&env("IP=10.10.0.9"), &c).unwrap(),
            ip("10.10.0.9")
        );
        assert_eq!(
            requested_ip(&env("IP=10.10.0.8"), &c).unwrap_err().code,
            Code::InvalidConfig
        );
        // The code-2 message names the key and its value.
        let e = requested_ip(&env("K8S_POD_NAME=web"), &plain).unwrap_err();
        assert_eq!(e.code, Code::UnsupportedField);
        assert!(
            e.msg.contains("K8S_POD_NAME") && e.msg.contains("web"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn every_requested_mac_is_honoured_or_refused() {
        let env = |args: &str| Env {
            command: "ADD".into(),
            args: Some(args.into()),
            ..Default::default()
        };
        let mac = |s: &str| Some(s.parse::<Mac>().unwrap());
        let plain = conf_with("");
        assert_eq!(requested_mac(&Env::default(), &plain).unwrap(), None);
        assert_eq!(
            requested_mac(&env("MAC=02:AA:00:00:00:01"), &plain).unwrap(),
            mac("02:aa:00:00:00:01")
        );
        let c = conf_with(r#","runtimeConfig":{"mac":"02:aa:00:00:00:02"}"#);
        assert_eq!(
            requested_mac(&Env::default(), &c).unwrap(),
            mac("02:aa:00:00:00:02")
        );
        let c2 = conf_with(r#","args":{"cni":{"mac":"02:aa:00:00:00:03"}}"#);
        assert_eq!(
            requested_mac(&Env::default(), &c2).unwrap(),
            mac("02:aa:00:00:00:03")
        );
        for bad in [
            "MAC=banana",
            "MAC=01:00:5e:00:00:01",
            "MAC=02:aa:00:00:00:09",
        ] {
            assert_eq!(
                requested_mac(&env(bad), &c).unwrap_err().code,
                Code::InvalidConfig,
                "{bad}"
            );
        }
    }

    #[test]
    fn gc_list_from_either_key_or_none() {
        assert_eq!(conf_with("").gc_attachments(), None);
        assert_eq!(
            conf_with(r#","cni.dev/attachments":null"#).gc_attachments(),
            None
        );
        let a = r#"{"containerID":"a","ifname":"eth0"}"#;
        let b = r#"{"containerID":"b","ifname":"eth0"}"#;
        let one = conf_with(&format!(r#","cni.dev/attachments":[{a}]"#));
        assert_eq!(one.gc_attachments().unwrap().len(), 1);
        let other = conf_with(&format!(r#","cni.dev/valid-attachments":[{b}]"#));
        assert_eq!(other.gc_attachments().unwrap()[0].container_id, "b");
        let both = conf_with(&format!(
            r#","cni.dev/attachments":[{a}],"cni.dev/valid-attachments":[{a},{b}]"#
        ));
        assert_eq!(both.gc_attachments().unwrap().len(), 2);
        let empty = conf_with(r#","cni.dev/attachments":[]"#);
        assert_eq!(empty.gc_attachments(), Some(vec![]));
    }
}
