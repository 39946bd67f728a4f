//! The HTTP side of the metrics: bind `--metrics ADDR` and serve
//! `GET /metrics` from a [`Metrics`] handle.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::{CONTENT_TYPE, Metrics};

/// The `--metrics` address is not usable; the message says what to give.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "--metrics {addr}: not an IP:PORT address: give an address of this host and a port, \
         e.g. --metrics 10.0.0.1:9472 (0.0.0.0:9472 listens on every address)"
    )]
    NotAnAddress { addr: String },
    #[error(
        "--metrics {addr}: cannot listen there: use an address this host (its network namespace) has \
         and a port no other process uses: {io}"
    )]
    Listen { addr: String, io: std::io::Error },
}

/// Parse and bind `--metrics ADDR` (IP:PORT). Call before anything is
/// applied: a bad address fails the agent at once.
pub async fn bind(addr: &str) -> Result<TcpListener, BindError> {
    let sa: SocketAddr = addr.parse().map_err(|_| BindError::NotAnAddress {
        addr: addr.to_string(),
    })?;
    TcpListener::bind(sa).await.map_err(|io| BindError::Listen {
        addr: addr.to_string(),
        io,
    })
}

/// Connections served at once (further ones wait in the listen backlog).
const MAX_CONNECTIONS: usize = 16;

/// The HTTP server [`serve`] started; dropping it stops the server.
pub struct Server(tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serve `GET /metrics` on `listener` (on the current tokio runtime) until
/// the returned [`Server`] is dropped. Other paths get 404, methods other
/// than GET and HEAD 405.
pub fn serve(listener: TcpListener, metrics: Metrics) -> Server {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    tracing::info!("serving metrics on http://{local}/metrics");
    // Scrapers are few; a client opening many connections gets no more.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Server(tokio::spawn(async move {
        let mut last_error: Option<String> = None;
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: log once, back off.
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!("metrics listener {local}: accept: {msg}");
                        last_error = Some(msg);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let io = hyper_util::rt::TokioIo::new(stream);
                let svc = hyper::service::service_fn(move |req| {
                    let m = m.clone();
                    async move { Ok::<_, Infallible>(respond(&m, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .keep_alive(true)
                    .serve_connection(io, svc);
                if let Err(e) = conn.await {
                    tracing::debug!("metrics connection: {e}");
                }
            });
        }
    }))
}

fn respond<B>(m: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &str| {
        let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(m.encode())));
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
    fn http_answers() {
        let m = Metrics::new();
        let req = |method: Method, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap()
        };
        let r = respond(&m, &req(Method::GET, "/metrics"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(
            respond(&m, &req(Method::GET, "/")).status(),
            StatusCode::NOT_FOUND
        );
        let r = respond(&m, &req(Method::POST, "/metrics"));
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[hyper::header::ALLOW], "GET, HEAD");
    }

    #[tokio::test]
    async fn bad_addresses_name_the_option_and_the_fix() {
        for bad in ["localhost", "10.0.0.1", "10.0.0.1:99999", ":9472"] {
            let e = format!("{:#}", bind(bad).await.unwrap_err());
            assert!(
                e.contains("--metrics") && e.contains("IP:PORT"),
                "{bad}: {e}"
            );
        }
    }
}
