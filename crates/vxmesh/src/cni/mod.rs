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
};
pub use env::Env;
pub use error::{CniError, CniResult, Code};
pub use result::{
    AddResult, Dns, ErrorReply, Interface, IpConfig, Route, VersionReply, merge_prev,
};

/// Run one plugin invocation. Returns the JSON to print on success.
pub async fn run(env: &Env, stdin: &[u8]) -> CniResult<Option<Value>> {
    if env.command == "VERSION" {
        let reply = VersionReply {
            cni_version: "1.1.0".to_string(),
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
/// the error JSON on stdout and returns the exit code.
pub fn main() -> i32 {
    let vars: HashMap<String, String> = std::env::vars().collect();
    let env = Env::from_vars(&vars);
    let mut stdin = Vec::new();
    if env.command != "VERSION"
        && let Err(e) = std::io::stdin().read_to_end(&mut stdin)
    {
        let err = CniError::new(Code::IoFailure, "cannot read stdin", e.to_string());
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
            println!("{}", e.to_json(&version));
            1
        }
    }
}
