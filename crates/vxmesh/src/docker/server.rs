//! The plugin's HTTP server: Docker POSTs JSON to `/Group.Method` over a
//! unix socket (found by Docker as `/run/docker/plugins/NAME.sock`) or TCP
//! (named in a `NAME.spec` file).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Plugin;
use super::protocol::CONTENT_TYPE;

/// The default socket: Docker finds a plugin named `vxmesh` there.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/vxmesh.sock";

/// Where the plugin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("docker plugin: cannot listen on {addr}: {io}")]
    Listen { addr: String, io: std::io::Error },
    #[error(
        "docker plugin: {path} exists and a process answers on it: is another plugin running? stop it, or give another --socket"
    )]
    InUse { path: String },
}

/// A bound listener, ready to serve.
pub enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
    /// A unix socket systemd made and passed (socket activation): served
    /// like [`Listener::Unix`], but its file belongs to systemd and stays.
    Passed(tokio::net::UnixListener, PathBuf),
}

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const SD_LISTEN_FDS_START: std::os::fd::RawFd = 3;

/// Whether systemd passed this process sockets: `LISTEN_PID` names this
/// process and `LISTEN_FDS` is at least 1 (sd_listen_fds(3)).
fn systemd_passed_sockets(listen_pid: Option<&str>, listen_fds: Option<&str>, pid: u32) -> bool {
    listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(pid)
        && listen_fds
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0)
            >= 1
}

impl Listener {
    /// Bind `listen`. A unix socket gets mode 0600; a stale socket file
    /// (nobody answers on it) is replaced.
    pub async fn bind(listen: &Listen) -> Result<Listener, ServeError> {
        match listen {
            Listen::Tcp(addr) => tokio::net::TcpListener::bind(addr)
                .await
                .map(Listener::Tcp)
                .map_err(|io| ServeError::Listen {
                    addr: addr.to_string(),
                    io,
                }),
            Listen::Unix(path) => {
                let fail = |io| ServeError::Listen {
                    addr: path.display().to_string(),
                    io,
                };
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(fail)?;
                }
                if path.exists() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(ServeError::InUse {
                            path: path.display().to_string(),
                        });
                    }
                    std::fs::remove_file(path).map_err(fail)?;
                }
                let l = tokio::net::UnixListener::bind(path).map_err(fail)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(fail)?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The socket systemd passed to this process (socket activation, as
    /// `vxmesh-docker-plugin.socket` does), if it did: the first one. A unix
    /// socket is served as is (mode and path as the unit set them); a TCP
    /// one too. `None` when systemd passed nothing.
    pub fn from_systemd() -> Result<Option<Listener>, ServeError> {
        let pid = std::env::var("LISTEN_PID").ok();
        let fds = std::env::var("LISTEN_FDS").ok();
        if !systemd_passed_sockets(pid.as_deref(), fds.as_deref(), std::process::id()) {
            return Ok(None);
        }
        let fail = |io| ServeError::Listen {
            addr: format!("the socket systemd passed (fd {SD_LISTEN_FDS_START})"),
            io,
        };
        // SAFETY: with LISTEN_PID naming this process, systemd guarantees
        // that fd 3 is an open listening socket handed to it, owned by
        // nobody else in this process; it is taken over exactly once here.
        let owned = unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(SD_LISTEN_FDS_START)
        };
        let sock = socket2::Socket::from(owned);
        sock.set_nonblocking(true).map_err(fail)?;
        let local = sock.local_addr().map_err(fail)?;
        let owned = std::os::fd::OwnedFd::from(sock);
        if local.is_unix() {
            let path = local
                .as_pathname()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("(unnamed)"));
            let std_l = std::os::unix::net::UnixListener::from(owned);
            let l = tokio::net::UnixListener::from_std(std_l).map_err(fail)?;
            Ok(Some(Listener::Passed(l, path)))
        } else {
            let std_l = std::net::TcpListener::from(owned);
            let l = tokio::net::TcpListener::from_std(std_l).map_err(fail)?;
            Ok(Some(Listener::Tcp(l)))
        }
    }

    /// What Docker is to be told (a socket path, or `tcp://IP:PORT`).
    pub fn url(&self) -> String {
        match self {
            Listener::Unix(_, p) | Listener::Passed(_, p) => format!("unix://{}", p.display()),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp://{a}"))
                .unwrap_or_default(),
        }
    }

    /// Serve until `shutdown` completes; a unix socket file is removed then.
    pub async fn serve(self, plugin: Arc<Plugin>, shutdown: impl std::future::Future<Output = ()>) {
        tracing::info!("docker plugin listening on {}", self.url());
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                a = accept(&self) => a,
            };
            match accepted {
                Ok(Conn::Unix(s)) => spawn_conn(s, plugin.clone()),
                Ok(Conn::Tcp(s)) => spawn_conn(s, plugin.clone()),
                Err(e) => {
                    tracing::warn!("docker plugin: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if let Listener::Unix(_, path) = &self {
            remove_socket(path);
        }
    }
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("docker plugin: remove {}: {e}", path.display());
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    match l {
        Listener::Unix(l, _) | Listener::Passed(l, _) => {
            l.accept().await.map(|(s, _)| Conn::Unix(s))
        }
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
    }
}

fn spawn_conn<S>(stream: S, plugin: Arc<Plugin>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let io = hyper_util::rt::TokioIo::new(stream);
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let plugin = plugin.clone();
            async move { Ok::<_, Infallible>(respond(&plugin, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, svc);
        if let Err(e) = conn.await {
            tracing::debug!("docker plugin connection: {e}");
        }
    });
}

async fn respond(plugin: &Plugin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "Err": format!("{path}: cannot read the request: {e}") }),
            );
        }
    };
    tracing::debug!("{path} {}", String::from_utf8_lossy(&body));
    let r = plugin.handle(&path, &body).await;
    tracing::debug!("{path} -> {} {}", r.status, r.body);
    reply(
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        r.body,
    )
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_sockets_only_for_this_process() {
        assert!(systemd_passed_sockets(Some("42"), Some("1"), 42));
        assert!(systemd_passed_sockets(Some("42"), Some("2"), 42));
        // Meant for another process (inherited environment).
        assert!(!systemd_passed_sockets(Some("41"), Some("1"), 42));
        assert!(!systemd_passed_sockets(Some("42"), Some("0"), 42));
        assert!(!systemd_passed_sockets(None, Some("1"), 42));
        assert!(!systemd_passed_sockets(Some("42"), None, 42));
        assert!(!systemd_passed_sockets(Some("x"), Some("1"), 42));
    }
}
