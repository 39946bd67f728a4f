//! The lab's CNI attach path: the vxmesh binary run as a plugin, exactly as a
//! container runtime runs it.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use vxmesh::cni::{AddResult, Env, ErrorReply};
use vxmesh::dataplane::netns::{self, Netns};

/// Attach through the CNI protocol, exactly as a runtime does: run `exe` as a
/// plugin inside the node's namespace with `CNI_COMMAND=ADD` and the network
/// configuration on stdin, and take the address from its result. A wanted
/// address goes in `CNI_ARGS` (`IP=`, the host-local/static convention); the
/// plugin's answer is authoritative.
pub(super) async fn cni_add(
    exe: &Path,
    host_ns: Netns,
    state_dir: &Path,
    network: &str,
    id: &str,
    container_ns: &str,
    ip: Option<Ipv4Addr>,
) -> Result<Ipv4Addr> {
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": format!("vxmesh-{network}"), "type": "vxmesh",
        "network": network, "stateDir": state_dir,
    });
    let netns_path = Path::new(netns::NETNS_DIR).join(container_ns);
    let mut env = Env::for_container("ADD", id, &netns_path.display().to_string(), "eth0")
        .with_path(exe.parent().unwrap_or(Path::new("/")).display().to_string());
    if let Some(ip) = ip {
        env = env.with_args(format!("IgnoreUnknown=1;IP={ip}"));
    }
    let env = env.to_vars();
    let exe = exe.to_path_buf();
    let what = format!(
        "CNI ADD of container '{id}' to network '{network}' ({})",
        exe.display()
    );
    let out = tokio::task::spawn_blocking(move || {
        run_plugin(
            &exe,
            &host_ns,
            &env,
            conf.to_string().as_bytes(),
            Duration::from_secs(30),
        )
    })
    .await
    .context("plugin thread")?
    .with_context(|| what.clone())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "{what}: the plugin printed no JSON ({}); stdout: {stdout}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if !out.status.success() {
        let e: ErrorReply = serde_json::from_value(result.clone()).unwrap_or_default();
        let code = e.code.map_or(serde_json::Value::Null, Into::into);
        bail!(
            "{what} failed ({}): error {code}: {}: {}",
            out.status,
            e.msg,
            e.details
        );
    }
    let added: AddResult = serde_json::from_value(result.clone())
        .with_context(|| format!("{what}: the result is not a CNI result: {result}"))?;
    let got = added
        .first_ipv4()
        .with_context(|| format!("{what}: the result has no IPv4 address: {result}"))?;
    if ip.is_some_and(|w| w != got) {
        tracing::info!(
            "{what}: asked for {}, the plugin allocated {got}",
            ip.unwrap_or(got)
        );
    }
    Ok(got)
}

/// Run a CNI plugin in `ns` with exactly `env`, `stdin` as input; give up after `timeout`.
pub(crate) fn run_plugin(
    exe: &Path,
    ns: &Netns,
    env: &[(String, String)],
    stdin: &[u8],
    timeout: Duration,
) -> Result<std::process::Output> {
    use std::io::Write;
    let mut cmd = Command::new(exe);
    cmd.env_clear().env(
        "PATH",
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
    );
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ns.enter_on_exec(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("run {} in {}", exe.display(), ns.name()))?;
    let written = child.stdin.take().context("plugin stdin")?.write_all(stdin);
    let out = super::child::output_within(child, timeout, "the plugin")?;
    if out.status.success() {
        written.context("write the network configuration to the plugin")?;
    }
    Ok(out)
}
