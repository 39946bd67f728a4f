//! Running the vxmesh binary as a CNI plugin, as libcni does: a clean
//! environment with CNI_COMMAND, CNI_PATH and the given variables, the
//! configuration on stdin, inside the node's namespace.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use vxmesh::dataplane::netns::Netns;

/// What one plugin call printed.
pub struct Out {
    pub code: i32,
    /// stdout as JSON (`Null` when empty).
    pub json: Value,
    pub stderr: String,
}

/// Run `plugin` in `host_ns` with CNI_* variables and `stdin`.
pub fn run_cni(
    plugin: &Path,
    host_ns: &str,
    command: &str,
    env: &[(&str, &str)],
    stdin: &str,
) -> Out {
    let ns = Netns::open(host_ns).unwrap();
    let mut cmd = Command::new(plugin);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/opt/cni/bin");
    for (k, v) in env {
        cmd.env(k, v);
    }
    ns.enter_on_exec(&mut cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    Out {
        code: out.status.code().unwrap_or(-1),
        json: if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"))
        },
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}
