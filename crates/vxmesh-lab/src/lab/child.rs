//! Waiting for a child process with a deadline: a hung tool (a plugin, a
//! wedged dockerd behind its client) fails the lab's step instead of
//! hanging it forever.

use std::io::Read;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Wait for `child` (stdout and stderr piped, read on threads so a chatty
/// child never blocks on a full pipe) at most `timeout`; past it, kill it
/// and fail naming `what`.
pub(crate) fn output_within(mut child: Child, timeout: Duration, what: &str) -> Result<Output> {
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_t = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}
