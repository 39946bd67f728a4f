//! Starting many processes at one moment: each is spawned behind a gate
//! (a pipe it waits on in a shell) and becomes its program, same pid,
//! when the gate opens.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// Where a gated process finds the gate's read end.
const GATE_FD: i32 = 3;

/// Wait for the gate (a read on [`GATE_FD`] that returns at end of file),
/// close it, and become the program ("$0") with its arguments.
const GATED: &str = r#"read -r gate <&3; exec 3<&- "$0" "$@""#;

/// A pipe that holds back processes spawned through [`StartGate::command`]
/// until [`StartGate::open`]: each waits, in a shell, for the end of file
/// of the pipe, which comes when its only write end (held here, never
/// inherited) is closed.
pub struct StartGate {
    read: std::os::fd::OwnedFd,
    write: Option<std::os::fd::OwnedFd>,
}

impl StartGate {
    pub fn new() -> Result<StartGate> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("start gate: pipe")?;
        Ok(StartGate {
            read,
            write: Some(write),
        })
    }

    /// A command that runs `program` once the gate opens (arguments added
    /// to it go to `program`).
    pub fn command(&self, program: &Path) -> Command {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(GATED).arg(program);
        let read = self.read.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls:
        // dup2 and fcntl on descriptors this process holds.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(read, GATE_FD) < 0 || libc::fcntl(GATE_FD, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Open the gate: every process waiting behind it goes on.
    pub fn open(&mut self) {
        self.write = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_gated_process_runs_only_once_the_gate_opens_and_keeps_its_pid() {
        let dir = std::env::temp_dir().join(format!("vxm-gate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("pid");
        let mut gate = StartGate::new().unwrap();
        let mut child = gate
            .command(Path::new("/bin/sh"))
            .arg("-c")
            .arg(format!("echo $$ > {}", out.display()))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(!out.exists(), "ran before the gate opened");
        assert!(child.try_wait().unwrap().is_none());
        gate.open();
        assert!(child.wait().unwrap().success());
        let pid = std::fs::read_to_string(&out).unwrap();
        assert_eq!(pid.trim(), child.id().to_string());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
