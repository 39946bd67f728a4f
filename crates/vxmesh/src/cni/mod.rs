//! The CNI plugin (spec 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0): `vxmesh` run
//! with `CNI_COMMAND` set. Results are written in the configuration's
//! version; CHECK needs 0.4.0, STATUS and GC 1.1.0.
//!
//! Network configuration:
//! ```json
//! { "cniVersion": "1.1.0", "name": "overlay", "type": "vxmesh",
//!   "network": "demo", "stateDir": "/run/vxmesh", "mtu": 1400 }
//! ```
//! `network` names a network the node's agent serves; the agent publishes it
//! in `stateDir`. ADD/DEL share the attach code of `vxmesh attach` and the
//! lab, so one allocator (under a file lock) serves all of them.
//!
//! Logs go to stderr (runtimes collect it), warnings and errors only unless
//! `VXMESH_CNI_LOG` or the configuration's `logLevel` says otherwise.
//!
//! The module by idea: [`env`] (the CNI_* environment), [`config`] (the
//! configuration on stdin), [`result`] (what the plugin prints), [`error`]
//! (spec error codes), [`commands`] (ADD, DEL, CHECK, STATUS) and [`gc`].

use std::collections::HashMap;
use std::io::Read;

use serde_json::Value;

mod commands;
pub mod config;
pub mod env;
pub mod error;
mod gc;
pub mod result;

pub use commands::{PrevExpectations, prev_expectations};
pub use config::{
    NetConf, SUPPORTED_VERSIONS, ValidAttachment, parse_conf, reply_version, requested_ip,
    requested_mac,
};
pub use env::Env;
pub use error::{CniError, CniResult, Code};
pub use result::{
    AddResult, Dns, ErrorReply, Interface, IpConfig, Route, VersionReply, convert_result,
    merge_prev,
};

/// The variable that sets the plugin's log level (it wins over `logLevel`).
pub const LOG_ENV: &str = "VXMESH_CNI_LOG";

/// The log level of one invocation: `VXMESH_CNI_LOG`, else the
/// configuration's `logLevel`, else `warn`.
pub fn log_level(env_value: Option<&str>, stdin: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Level {
        #[serde(rename = "logLevel")]
        log_level: Option<String>,
    }
    env_value
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .or_else(|| {
            serde_json::from_slice::<Level>(stdin)
                .ok()
                .and_then(|l| l.log_level)
        })
        .unwrap_or_else(|| "warn".to_string())
}

/// Run one plugin invocation. Returns the JSON to print on success.
pub async fn run(env: &Env, stdin: &[u8]) -> CniResult<Option<Value>> {
    if env.command == "VERSION" {
        // Echo the version the runtime speaks (libcni sends it on stdin).
        let reply = VersionReply {
            cni_version: reply_version(stdin),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        };
        return Ok(Some(
            serde_json::to_value(reply).expect("a version reply is plain JSON"),
        ));
    }
    let conf = parse_conf(stdin)?;
    match env.command.as_str() {
        "ADD" => commands::add(env, &conf).await.map(Some),
        "DEL" => commands::del(env, &conf).await.map(|_| None),
        "CHECK" if !config::at_least(&conf.cni_version, "0.4.0") => Err(CniError::new(
            Code::IncompatibleVersion,
            format!("CHECK is not defined in CNI {}", conf.cni_version),
            "CHECK needs cniVersion 0.4.0 or later",
        )),
        "CHECK" => commands::check(env, &conf).await.map(|_| None),
        "STATUS" => commands::status(&conf).map(|_| None),
        "GC" => gc::gc(&conf).await.map(|_| None),
        "" => Err(CniError::new(
            Code::InvalidEnv,
            "CNI_COMMAND is not set",
            "",
        )),
        other => Err(CniError::new(
            Code::InvalidEnv,
            format!("unknown CNI_COMMAND '{other}'"),
            "use ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

/// Entry point from `main` when `CNI_COMMAND` is set. Prints the result or
/// the error JSON on stdout and returns the exit code. `init_logging` gets
/// the level (see [`log_level`]) and sets up logging to stderr.
pub fn main(init_logging: impl FnOnce(&str)) -> i32 {
    use std::io::IsTerminal;
    let vars: HashMap<String, String> = std::env::vars().collect();
    let env = Env::from_vars(&vars);
    let mut stdin = Vec::new();
    // VERSION reads the runtime's version from stdin when there is one.
    let read = if env.command == "VERSION" && std::io::stdin().is_terminal() {
        Ok(0)
    } else {
        std::io::stdin().read_to_end(&mut stdin)
    };
    init_logging(&log_level(vars.get(LOG_ENV).map(String::as_str), &stdin));
    if let Err(e) = read {
        let err = CniError::new(Code::IoFailure, "cannot read stdin", e.to_string());
        tracing::error!("{err}: {}", err.details);
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
                CniError::new(Code::IoFailure, "cannot start runtime", e.to_string())
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
            tracing::error!("{} {}: {}", env.command, e, e.details);
            println!("{}", e.to_json(&version));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_from_env_then_conf_then_warn() {
        let conf = br#"{"cniVersion":"1.1.0","logLevel":"debug"}"#;
        assert_eq!(log_level(Some("trace"), conf), "trace");
        assert_eq!(log_level(None, conf), "debug");
        assert_eq!(log_level(Some(""), conf), "debug");
        assert_eq!(log_level(None, b"{}"), "warn");
        assert_eq!(log_level(None, b"not json"), "warn");
    }

    #[tokio::test]
    async fn version_echoes_the_runtimes_version() {
        let env = Env {
            command: "VERSION".into(),
            ..Default::default()
        };
        for v in SUPPORTED_VERSIONS {
            let stdin = format!(r#"{{"cniVersion":"{v}"}}"#);
            let out = run(&env, stdin.as_bytes()).await.unwrap().unwrap();
            assert_eq!(out["cniVersion"], serde_json::json!(v));
            assert_eq!(out["supportedVersions"].as_array().unwrap().len(), 5);
        }
        let out = run(&env, b"").await.unwrap().unwrap();
        assert_eq!(out["cniVersion"], serde_json::json!("1.1.0"));
    }
}
