//! The plugin's input: the network configuration on stdin (and the
//! address a runtime asks for through it or CNI_ARGS).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::env::Env;
use super::error::{CniError, CniResult, Code};
use crate::state;

/// The CNI versions vxmesh speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

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
            Code::InvalidConfig,
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
                    Code::UnsupportedField,
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

pub(super) fn version_ok(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

pub(super) fn at_least_1_1(v: &str) -> bool {
    v == "1.1.0"
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
            parse_conf(br#"{"cniVersion":"0.4.0","name":"n","type":"vxmesh","network":"demo"}"#)
                .unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
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
}
