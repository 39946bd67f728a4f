//! A tiny TCP responder and its client: the responder answers every
//! connection with one line naming itself, so a probe knows not only that a
//! port answered but who (the outside host, the container a published port
//! leads to).

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use vxmesh::dataplane::netns::Netns;

/// A responder running on a thread; stopped (and joined) on drop.
pub struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddrV4,
}

/// The line a responder named `name` answers with.
pub fn hello_line(name: &str) -> String {
    format!("vxmesh-hello {name}\n")
}

impl Responder {
    /// Listen on `addr` inside `ns` and answer each connection with
    /// [`hello_line`]`(name)`.
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str) -> Result<Responder> {
        let listener = ns
            .run(move || TcpListener::bind(addr).with_context(|| format!("listen on {addr}")))
            .with_context(|| format!("TCP responder in network namespace '{}'", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let line = hello_line(name);
        let thread = std::thread::Builder::new()
            .name("vxm-hello".into())
            .spawn(move || serve(&listener, &line, &stopped))
            .context("spawn TCP responder thread")?;
        Ok(Responder {
            stop,
            thread: Some(thread),
            addr,
        })
    }
}

fn serve(listener: &TcpListener, line: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(line.as_bytes());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connect from `ns` to `dst` and return the responder's name (the line
/// after `vxmesh-hello `). Err on refusal, timeout or a foreign answer.
pub fn tcp_hello(ns: &Netns, dst: SocketAddrV4, timeout: Duration) -> Result<String> {
    let mut s = ns
        .run(move || {
            TcpStream::connect_timeout(&dst.into(), timeout)
                .with_context(|| format!("connect to {dst}"))
        })
        .with_context(|| format!("from network namespace '{}'", ns.name()))?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .with_context(|| format!("read the answer of {dst}"))?;
    buf.strip_prefix("vxmesh-hello ")
        .map(|n| n.trim_end().to_string())
        .ok_or_else(|| anyhow!("{dst} answered {buf:?}, not a vxmesh hello"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_line_parses_back() {
        assert_eq!(hello_line("host1-c1"), "vxmesh-hello host1-c1\n");
    }
}
