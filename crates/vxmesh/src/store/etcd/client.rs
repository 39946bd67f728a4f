//! Reaching etcd: options, connection, per-request timeouts, error hints,
//! connection health reporting and retry backoff.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, PutOptions, TxnOpResponse};
use tokio::task::JoinHandle;

use crate::store::error::{Result, StoreError};

use super::records;
use crate::metrics::Metrics;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/vxmesh";
/// Default lease TTL: a crashed node disappears from its peers after this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// etcd's smallest lease TTL with its default election timeout.
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// Every single etcd request gives up after this long.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Cap of the retry backoff while etcd is unreachable.
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// TLS material for `https://` endpoints (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificate that signed the etcd server certificate.
    pub ca: PathBuf,
    /// Client certificate and key, when etcd requires client authentication
    /// (`--client-cert-auth`): both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How to reach etcd.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// `http://host:2379` or `https://host:2379` (one or more members).
    pub endpoints: Vec<String>,
    pub tls: Option<TlsOptions>,
    /// User name and password, when etcd has authentication enabled.
    pub user: Option<(String, String)>,
}

impl ClientOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        ClientOptions {
            endpoints,
            tls: None,
            user: None,
        }
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "<redacted>")))
            .finish()
    }
}

/// Everything [`EtcdStore::join`](super::EtcdStore::join) needs.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix, default [`DEFAULT_PREFIX`].
    pub prefix: String,
    /// Name of the network to join (its config must exist: [`create_network`](super::create_network)).
    pub network: String,
    /// This node's name (unique in the cluster).
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_dev: Option<String>,
    /// Lease TTL (whole seconds, at least [`MIN_TTL`]); default [`DEFAULT_TTL`].
    pub ttl: Duration,
    pub tls: Option<TlsOptions>,
    pub user: Option<(String, String)>,
    /// Where the store records whether it is connected and the invalid
    /// records it skipped (the agent's; default: a fresh, unserved set).
    pub metrics: Metrics,
    /// The WireGuard keys the node record lists (secure underlay).
    pub keys: crate::secure::ListedKeys,
}

impl EtcdOptions {
    /// Options with the default prefix and TTL, no TLS and no user.
    pub fn new(endpoints: Vec<String>, network: &str, node: &str, underlay_ip: Ipv4Addr) -> Self {
        EtcdOptions {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            network: network.to_string(),
            node: node.to_string(),
            underlay_ip,
            underlay_dev: None,
            ttl: DEFAULT_TTL,
            tls: None,
            user: None,
            metrics: Metrics::new(),
            keys: Default::default(),
        }
    }

    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            endpoints: self.endpoints.clone(),
            tls: self.tls.clone(),
            user: self.user.clone(),
        }
    }

    /// Every problem, each naming the option and the fix.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        if let Err(e) = check_client(&self.client_options()) {
            p.push(e);
        }
        if let Err(e) = records::check_prefix(&self.prefix) {
            p.push(format!("prefix: {e}"));
        }
        if let Err(e) = records::check_network_name(&self.network) {
            p.push(format!("network: {e}"));
        }
        if let Err(e) = records::check_node_name(&self.node) {
            p.push(format!("node: {e}"));
        }
        if let Err(e) = records::check_underlay_ip(self.underlay_ip) {
            p.push(format!("underlay_ip: {e}"));
        }
        if let Some(d) = &self.underlay_dev
            && let Err(e) = records::check_underlay_dev(d)
        {
            p.push(format!("underlay_dev: {e}"));
        }
        if self.ttl < MIN_TTL || self.ttl > Duration::from_secs(3600) {
            p.push(format!(
                "ttl: {:?} is out of range: use {}s to 3600s (default {}s)",
                self.ttl,
                MIN_TTL.as_secs(),
                DEFAULT_TTL.as_secs()
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(StoreError::InvalidOptions {
                what: "store",
                problems: p.join("; "),
            })
        }
    }
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("network", &self.network)
            .field("node", &self.node)
            .field("underlay_ip", &self.underlay_ip)
            .field("underlay_dev", &self.underlay_dev)
            .field("ttl", &self.ttl)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "<redacted>")))
            .finish()
    }
}

/// Endpoints of a `--store` URL: `etcd://HOST:PORT[,HOST2:PORT2]` (port
/// default 2379; `https://` when `tls`, else `http://`), or a comma-separated
/// list of `http://` / `https://` URLs taken as they are.
pub fn parse_store_url(url: &str, tls: bool) -> Result<Vec<String>> {
    let usage = || StoreError::BadStoreUrl {
        url: url.to_string(),
    };
    let scheme = if tls { "https" } else { "http" };
    let mut out = Vec::new();
    if let Some(hosts) = url.strip_prefix("etcd://") {
        for h in hosts.split(',') {
            let h = h.trim().trim_end_matches('/');
            if h.is_empty() || h.contains('/') || h.contains('@') || h.contains(char::is_whitespace)
            {
                return Err(usage());
            }
            // A bare IPv4 address or name gets the default port.
            let with_port = match h.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && !host.contains(':') => {
                    port.parse::<u16>().map_err(|_| usage())?;
                    h.to_string()
                }
                Some(_) if h.starts_with('[') && h.ends_with(']') => format!("{h}:2379"),
                Some(_) if h.starts_with('[') => h.to_string(),
                Some(_) => return Err(usage()),
                None => format!("{h}:2379"),
            };
            out.push(format!("{scheme}://{with_port}"));
        }
    } else if url.starts_with("http://") || url.starts_with("https://") {
        for u in url.split(',') {
            let u = u.trim();
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.len() <= "https://".len()
            {
                return Err(usage());
            }
            out.push(u.to_string());
        }
    } else {
        return Err(usage());
    }
    if out.is_empty() {
        return Err(usage());
    }
    Ok(out)
}

pub(crate) fn check_client(o: &ClientOptions) -> std::result::Result<(), String> {
    if o.endpoints.is_empty() || o.endpoints.iter().any(|e| e.trim().is_empty()) {
        return Err(
            "endpoints: give at least one etcd endpoint, like http://127.0.0.1:2379".into(),
        );
    }
    if let Some(t) = &o.tls {
        if t.cert.is_some() != t.key.is_some() {
            return Err("tls: give both a client certificate and its key, or neither".into());
        }
        if let Some(e) = o.endpoints.iter().find(|e| e.starts_with("http://")) {
            return Err(format!(
                "endpoints: {e} is plain http but TLS options are set: use https://"
            ));
        }
    }
    Ok(())
}

/// The connection settings of `o`: timeouts, keep-alive pings, `hasleader`
/// on every request and stream, user, TLS material (read from its files).
async fn connect_options(o: &ClientOptions) -> Result<ConnectOptions> {
    check_client(o).map_err(|problems| StoreError::InvalidOptions {
        what: "client",
        problems,
    })?;
    let mut co = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        // Every request, watch and lease keep-alive stream carries
        // `hasleader`: a member cut off from the quorum refuses them
        // instead of keeping a watch open that never delivers.
        .with_require_leader(true);
    if let Some((user, password)) = &o.user {
        co = co.with_user(user.clone(), password.clone());
    }
    if let Some(t) = &o.tls {
        let read = |p: &PathBuf| {
            let p = p.clone();
            async move {
                tokio::fs::read(&p)
                    .await
                    .map_err(|e| StoreError::io("read TLS file", p, e))
            }
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca).await?));
        if let (Some(c), Some(k)) = (&t.cert, &t.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read(c).await?,
                read(k).await?,
            ));
        }
        co = co.with_tls(tls);
    }
    Ok(co)
}

/// Connect (lazily: the first request tells whether etcd is reachable).
pub async fn connect(o: &ClientOptions) -> Result<Client> {
    let co = connect_options(o).await?;
    let eps = o.endpoints.join(",");
    let live = live_endpoints(&o.endpoints, &co).await;
    match tokio::time::timeout(OP_TIMEOUT, Client::connect(&live, Some(co))).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(StoreError::Connect {
            endpoints: eps,
            hint: hint(&e),
            error: e,
        }),
        Err(_) => Err(StoreError::ConnectTimeout {
            endpoints: eps,
            timeout: OP_TIMEOUT,
        }),
    }
}

/// How long a member may take to answer the status probe of [`connect`].
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Of several endpoints, those that answer a status request now (probed
/// concurrently, each within [`PROBE_TIMEOUT`]), in the given order; all of
/// them when none answers, so that connecting reports the failure.
///
/// A client balanced over a dead member keeps handing it requests that
/// fail ("connection refused"), so a node joining while one member of three
/// is down would spend its retries on that member; reconnecting (every join
/// attempt does) leaves the dead one out.
async fn live_endpoints(endpoints: &[String], co: &ConnectOptions) -> Vec<String> {
    if endpoints.len() < 2 {
        return endpoints.to_vec();
    }
    let probes = endpoints.iter().map(|ep| {
        let co = co.clone();
        async move {
            let answered = tokio::time::timeout(PROBE_TIMEOUT, async {
                let mut c = Client::connect([ep.as_str()], Some(co)).await?;
                c.status().await
            })
            .await;
            matches!(answered, Ok(Ok(_)))
        }
    });
    let answered = futures::future::join_all(probes).await;
    let live = pick_live(endpoints, &answered);
    if live.len() < endpoints.len() {
        tracing::debug!(
            "etcd: {} of {} members answer; connecting to {}",
            live.len(),
            endpoints.len(),
            live.join(",")
        );
    }
    live
}

/// The endpoints whose probe answered, in order; all of them if none did.
fn pick_live(endpoints: &[String], answered: &[bool]) -> Vec<String> {
    let live: Vec<String> = endpoints
        .iter()
        .zip(answered)
        .filter(|(_, ok)| **ok)
        .map(|(ep, _)| ep.clone())
        .collect();
    if live.is_empty() {
        endpoints.to_vec()
    } else {
        live
    }
}

/// A client of the first member of `o` to answer a status request within
/// `timeout` (all probed at once; the slowest is not waited for), or
/// `None` if none did. A lease keeper whose member stopped answering (paused,
/// or cut off from the quorum) moves to it: pinned to one member that
/// answers now, instead of a balanced channel that may pick the silent one
/// again.
pub(crate) async fn connect_answering(
    o: &ClientOptions,
    timeout: Duration,
) -> Option<(Client, String)> {
    let co = connect_options(o).await.ok()?;
    let mut probes: futures::stream::FuturesUnordered<_> = o
        .endpoints
        .iter()
        .map(|ep| {
            let co = co.clone();
            async move {
                let answered = tokio::time::timeout(timeout, async {
                    let mut c = Client::connect([ep.as_str()], Some(co)).await?;
                    c.status().await?;
                    Ok::<_, etcd_client::Error>(c)
                })
                .await;
                match answered {
                    Ok(Ok(c)) => Some((c, ep.clone())),
                    _ => None,
                }
            }
        })
        .collect();
    while let Some(r) = futures::StreamExt::next(&mut probes).await {
        if r.is_some() {
            return r;
        }
    }
    None
}

/// What to do about a few common etcd errors.
fn hint(e: &etcd_client::Error) -> &'static str {
    let m = e.to_string();
    if m.contains("user name is empty") {
        " (etcd has authentication enabled: give a user and password)"
    } else if m.contains("authentication failed") {
        " (check the etcd user name and password)"
    } else if m.contains("permission denied") {
        " (the etcd user needs read/write permission on the key prefix)"
    } else if m.contains("Certificate") || m.contains("certificate") {
        " (check the TLS CA, client certificate and key)"
    } else {
        ""
    }
}

/// Run one etcd request with the standard timeout; errors say what was tried.
pub async fn op<T>(
    what: impl fmt::Display,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Etcd {
            op: what.to_string(),
            hint: hint(&e),
            error: e,
        }),
        Err(_) => Err(StoreError::EtcdTimeout {
            op: what.to_string(),
            timeout: OP_TIMEOUT,
        }),
    }
}

pub(crate) fn lease_opts(lease: i64) -> Option<PutOptions> {
    Some(PutOptions::new().with_lease(lease))
}

/// The value of each `Get` in a transaction's responses (those that
/// found one).
pub(crate) fn txn_gets(resp: &etcd_client::TxnResponse) -> Vec<etcd_client::KeyValue> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        })
        .collect()
}

/// Connection health: logs once per change of state, not per retry.
pub(crate) struct Health {
    lease_ok: AtomicBool,
    watch_ok: AtomicBool,
    reported: Mutex<bool>,
    /// "node NODE, network NET", for the log lines.
    who: String,
    /// Told of every reported transition (`vxmesh_store_connected`).
    metrics: Metrics,
}

impl Health {
    pub(crate) fn new(who: String, metrics: Metrics) -> Self {
        Health {
            lease_ok: AtomicBool::new(true),
            watch_ok: AtomicBool::new(true),
            reported: Mutex::new(true),
            who,
            metrics,
        }
    }
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    pub(crate) fn connected(&self) -> bool {
        self.lease_ok.load(Ordering::SeqCst) && self.watch_ok.load(Ordering::SeqCst)
    }
    pub(crate) fn lease(&self, ok: bool, err: Option<&str>) {
        self.lease_ok.store(ok, Ordering::SeqCst);
        self.report(err);
    }
    pub(crate) fn watch(&self, ok: bool, err: Option<&str>) {
        self.watch_ok.store(ok, Ordering::SeqCst);
        self.report(err);
    }
    fn report(&self, err: Option<&str>) {
        let now = self.connected();
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        if *reported != now {
            *reported = now;
            self.metrics.store_link(now);
            if now {
                tracing::info!(
                    "{}: etcd connection restored: the view is live again",
                    self.who
                );
            } else {
                tracing::warn!(
                    "{}: etcd unreachable ({}): keeping the last known view, the data plane keeps working; retrying with backoff",
                    self.who,
                    err.unwrap_or("unknown error")
                );
            }
        } else if let Some(e) = err {
            tracing::debug!("{}: etcd still unreachable: {e}", self.who);
        }
    }
}

impl Drop for Health {
    /// A store dropped while disconnected no longer holds the gauge at 0.
    fn drop(&mut self) {
        let reported = self.reported.get_mut().unwrap_or_else(|e| e.into_inner());
        if !*reported {
            self.metrics.store_link(true);
        }
    }
}

/// Exponential backoff with a little jitter, capped at [`BACKOFF_CAP`] (or
/// less: a lease must be renewed well within its TTL once etcd is back).
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn capped(cap: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(100),
            cap: cap.clamp(Duration::from_millis(100), BACKOFF_CAP),
        }
    }
    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.subsec_nanos() % 50_000_000)
            .unwrap_or(0);
        d + Duration::from_nanos(jitter as u64)
    }
}

/// Aborts a helper task when dropped (also when the future owning it is cancelled).
pub(crate) struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn connect_skips_members_that_do_not_answer() {
        let eps: Vec<String> = ["a:2379", "b:2379", "c:2379"].map(String::from).to_vec();
        assert_eq!(pick_live(&eps, &[false, true, true]), eps[1..].to_vec());
        assert_eq!(
            pick_live(&eps, &[true, false, true]),
            vec![eps[0].clone(), eps[2].clone()]
        );
        // None answers: all of them, so the connect error names every member.
        assert_eq!(pick_live(&eps, &[false, false, false]), eps);
    }

    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(
            parse_store_url("etcd://198.18.0.254:2379", false).unwrap(),
            ["http://198.18.0.254:2379"]
        );
        assert_eq!(
            parse_store_url("etcd://a:2379,b", true).unwrap(),
            ["https://a:2379", "https://b:2379"]
        );
        assert_eq!(
            parse_store_url("http://a:1,https://b:2", false).unwrap(),
            ["http://a:1", "https://b:2"]
        );
        for bad in [
            "",
            "etcd://",
            "etcd://a:b",
            "etcd://a/x",
            "a:2379",
            "etcd://a:1,,b",
            "http://",
        ] {
            assert!(parse_store_url(bad, false).is_err(), "{bad} accepted");
        }
    }
}
