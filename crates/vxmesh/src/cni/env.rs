//! The CNI_* environment of one plugin invocation: read by the plugin,
//! built by callers that run a plugin the way a runtime does.

use std::collections::HashMap;

use super::error::{CniError, CniResult, Code};

/// The CNI_* environment (an empty variable counts as unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    /// CNI_COMMAND: ADD, DEL, CHECK, STATUS, GC or VERSION.
    pub command: String,
    /// CNI_CONTAINERID.
    pub container_id: Option<String>,
    /// CNI_NETNS: the path of the container's network namespace.
    pub netns: Option<String>,
    /// CNI_IFNAME: the interface to create inside the container.
    pub ifname: Option<String>,
    /// CNI_ARGS: `KEY=VALUE` pairs separated by `;`.
    pub args: Option<String>,
    /// CNI_PATH: where the runtime looks for plugins.
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

    /// The environment of a runtime's `command` (ADD, DEL, CHECK) for the
    /// interface `ifname` of container `container_id` in namespace `netns`.
    pub fn for_container(command: &str, container_id: &str, netns: &str, ifname: &str) -> Self {
        Env {
            command: command.to_string(),
            container_id: Some(container_id.to_string()),
            netns: Some(netns.to_string()),
            ifname: Some(ifname.to_string()),
            args: None,
            path: None,
        }
    }

    /// Set CNI_ARGS.
    pub fn with_args(mut self, args: impl Into<String>) -> Self {
        self.args = Some(args.into());
        self
    }

    /// Set CNI_PATH.
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// The variables to set for a plugin process; unset ones are left out.
    pub fn to_vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![("CNI_COMMAND".to_string(), self.command.clone())];
        for (k, v) in [
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_ARGS", &self.args),
            ("CNI_PATH", &self.path),
        ] {
            if let Some(v) = v {
                vars.push((k.to_string(), v.clone()));
            }
        }
        vars
    }

    /// The value of a variable the command needs, or error 4 naming it.
    pub(super) fn require<'a>(&self, v: &'a Option<String>, name: &str) -> CniResult<&'a str> {
        v.as_deref().ok_or_else(|| {
            CniError::new(
                Code::InvalidEnv,
                format!("{name} is not set"),
                format!("the runtime must set {name} for {}", self.command),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_environment_reads_back_the_same() {
        let env = Env::for_container("ADD", "c1", "/run/netns/c1", "eth0")
            .with_args("IgnoreUnknown=1;IP=10.0.0.5")
            .with_path("/opt/cni/bin");
        let vars: HashMap<String, String> = env.to_vars().into_iter().collect();
        assert_eq!(vars.len(), 6);
        assert_eq!(vars["CNI_NETNS"], "/run/netns/c1");
        assert_eq!(Env::from_vars(&vars), env);
    }

    #[test]
    fn unset_variables_are_left_out() {
        let env = Env::for_container("DEL", "c1", "/run/netns/c1", "eth0");
        let keys: Vec<String> = env.to_vars().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]
        );
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let vars: HashMap<String, String> = [("CNI_COMMAND", "ADD"), ("CNI_NETNS", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = Env::from_vars(&vars);
        assert_eq!(env.netns, None);
        let e = env.require(&env.netns, "CNI_NETNS").unwrap_err();
        assert_eq!(e.code, Code::InvalidEnv);
        assert_eq!(e.details, "the runtime must set CNI_NETNS for ADD");
    }
}
