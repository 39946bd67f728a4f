//! The etcd store (etcd v3 API, etcd-client crate): dynamic membership.
//!
//! # Key layout
//!
//! Everything of network `NET` lives under `PREFIX/networks/NET/` (prefix
//! default `/vxmesh`, see [`DEFAULT_PREFIX`]):
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `PREFIX/networks/NET/config` | JSON network: `{"name","mode","cidr","subnet_len","vni","port","mtu"}` | permanent ([`create_network`] / [`delete_network`]) |
//! | `PREFIX/networks/NET/subnets/A.B.C.D-LEN` | the claiming node's name (plain text) | the node's lease |
//! | `PREFIX/networks/NET/nodes/NODE` | JSON `{"name","underlay_ip","underlay_dev"?,"subnet"}` | the node's lease |
//! | `PREFIX/networks/NET/endpoints/A.B.C.D` | JSON endpoint `{"network","ip","mac","node"}` | the hosting node's lease |
//!
//! # How it works
//!
//! - [`EtcdStore::join`] grants a lease (TTL default 10 s) and keeps it alive
//!   in a background task every TTL/3. It claims a subnet (routed) or address
//!   slice (bridged) with a compare-and-swap transaction (`create_revision ==
//!   0` on the subnet key), writing the claim and the node record in the same
//!   transaction: two nodes can never hold one subnet, and a claim never
//!   exists without its record. A node reuses its own claim (a rejoin after a
//!   restart keeps its subnet); new claims try the subnets in an order that
//!   is deterministic but starts at a hash of the node name, so concurrent
//!   joins rarely collide and a node that left tends to get its old subnet
//!   back.
//! - A second background task lists `PREFIX/networks/NET/` once (revision R)
//!   and watches from R+1, keeping an in-memory view; after a disconnect it
//!   resumes from the last revision seen; if that revision was compacted it
//!   re-lists and the derived snapshot is diffed against the previous one.
//!   Records that fail validation are skipped and logged once per key and
//!   revision.
//! - If etcd is unreachable, [`Store::snapshot`] keeps returning the last view
//!   (the data plane keeps working) and the tasks retry with exponential
//!   backoff (capped at 5 s), logging once when the connection is lost and
//!   once when it is restored. If the lease expired meanwhile, a new lease is
//!   granted and the claim, record and endpoints are re-published under it.
//! - Lost nodes disappear when their lease expires: every peer's watch sees
//!   the deletes. [`EtcdStore::leave`] revokes the lease: the record, claim and
//!   endpoints vanish at once.
//!
//! Unlike flannel's etcd subnet manager: the claim is one CAS transaction
//! with the record (no read-then-write race), the watch resumes from the
//! listed revision (no missed events between list and watch), compaction is
//! handled by a re-list, and a lease lost during an outage is re-established.

mod records;
mod session;
mod view;
mod watcher;

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Snapshot, Store};
use crate::config::{Mode, Network};
use crate::model::{Endpoint, Mac, NodeRecord};
use records::Keys;
use view::View;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/vxmesh";
/// Default lease TTL: a crashed node disappears from its peers after this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// etcd's smallest lease TTL with its default election timeout.
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// Every single etcd request gives up after this long.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
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

/// Everything [`EtcdStore::join`] needs.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix, default [`DEFAULT_PREFIX`].
    pub prefix: String,
    /// Name of the network to join (its config must exist: [`create_network`]).
    pub network: String,
    /// This node's name (unique in the cluster).
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_dev: Option<String>,
    /// Lease TTL (whole seconds, at least [`MIN_TTL`]); default [`DEFAULT_TTL`].
    pub ttl: Duration,
    pub tls: Option<TlsOptions>,
    pub user: Option<(String, String)>,
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
    fn validate(&self) -> Result<()> {
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
            bail!("invalid etcd store options: {}", p.join("; "))
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

fn check_client(o: &ClientOptions) -> std::result::Result<(), String> {
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

/// Connect (lazily: the first request tells whether etcd is reachable).
async fn connect(o: &ClientOptions) -> Result<Client> {
    check_client(o).map_err(|e| anyhow!("invalid etcd client options: {e}"))?;
    let mut co = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &o.user {
        co = co.with_user(user.clone(), password.clone());
    }
    if let Some(t) = &o.tls {
        let read = |p: &PathBuf| {
            let p = p.clone();
            async move {
                tokio::fs::read(&p)
                    .await
                    .with_context(|| format!("read TLS file {}", p.display()))
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
    let eps = o.endpoints.join(",");
    match tokio::time::timeout(OP_TIMEOUT, Client::connect(&o.endpoints, Some(co))).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(anyhow!("connect to etcd at {eps}: {e}{}", hint(&e))),
        Err(_) => bail!(
            "connect to etcd at {eps}: no answer within {OP_TIMEOUT:?}: is etcd running and reachable?"
        ),
    }
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
pub(crate) async fn op<T>(
    what: impl fmt::Display,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("etcd: {what}: {e}{}", hint(&e))),
        Err(_) => {
            bail!("etcd: {what}: no answer within {OP_TIMEOUT:?} (is etcd running and reachable?)")
        }
    }
}

fn lease_opts(lease: i64) -> Option<PutOptions> {
    Some(PutOptions::new().with_lease(lease))
}

/// The value of the first `Get` in a transaction's responses.
fn txn_get(resp: &etcd_client::TxnResponse) -> Option<etcd_client::KeyValue> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

/// Write network `net` under `prefix` (validated first). Idempotent: an
/// identical existing config is fine; a different one is an error.
pub async fn create_network(client: &ClientOptions, prefix: &str, net: &Network) -> Result<()> {
    records::check_prefix(prefix).map_err(|e| anyhow!("prefix: {e}"))?;
    let valid =
        records::validate_network(&records::network_file(net)).map_err(|e| anyhow!("{e}"))?;
    let c = connect(client).await?;
    let keys = Keys::new(prefix, &net.name);
    let key = keys.config();
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), records::network_json(&valid), None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = op(format!("create {key}"), c.kv_client().txn(txn)).await?;
    if resp.succeeded() {
        tracing::info!(network = %net.name, key = %key, "network created");
        return Ok(());
    }
    let stored = txn_get(&resp)
        .map(|kv| kv.value().to_vec())
        .unwrap_or_default();
    match records::parse_network(&net.name, &stored) {
        Ok(s) if s == valid => Ok(()),
        Ok(s) => bail!(
            "network {} already exists with different settings ({}): delete it first",
            net.name,
            records::network_diff(&s, &valid)
        ),
        Err(e) => bail!(
            "network {} already exists but its stored config at {key} is invalid ({e}): delete it first",
            net.name
        ),
    }
}

/// Read network `name`'s config (`None` if it does not exist).
pub async fn get_network(
    client: &ClientOptions,
    prefix: &str,
    name: &str,
) -> Result<Option<Network>> {
    records::check_prefix(prefix).map_err(|e| anyhow!("prefix: {e}"))?;
    let c = connect(client).await?;
    read_network(&c, &Keys::new(prefix, name), name).await
}

async fn read_network(c: &Client, keys: &Keys, name: &str) -> Result<Option<Network>> {
    let key = keys.config();
    let resp = op(format!("read {key}"), c.kv_client().get(key.clone(), None)).await?;
    match resp.kvs().first() {
        None => Ok(None),
        Some(kv) => records::parse_network(name, kv.value())
            .map(Some)
            .map_err(|e| anyhow!("the config of network {name} at {key} is invalid: {e}: delete the network and create it again")),
    }
}

/// Delete network `name` and everything under it. Refuses while nodes are
/// still registered (make them leave first, or wait for their leases to expire).
pub async fn delete_network(client: &ClientOptions, prefix: &str, name: &str) -> Result<()> {
    records::check_prefix(prefix).map_err(|e| anyhow!("prefix: {e}"))?;
    let c = connect(client).await?;
    let keys = Keys::new(prefix, name);
    let nodes = op(
        "list nodes",
        c.kv_client().get(
            keys.nodes(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ),
    )
    .await?;
    if !nodes.kvs().is_empty() {
        let names: Vec<String> = nodes
            .kvs()
            .iter()
            .filter_map(|kv| {
                kv.key_str()
                    .ok()
                    .and_then(|k| k.rsplit('/').next())
                    .map(str::to_string)
            })
            .collect();
        bail!(
            "network {name} still has {} node(s) ({}): make them leave first (or stop them and wait for their leases to expire)",
            names.len(),
            names.join(", ")
        );
    }
    let root = keys.root().to_string();
    op(
        format!("delete {root}"),
        c.kv_client().delete(
            root.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ),
    )
    .await?;
    Ok(())
}

/// This node's identity.
#[derive(Clone, Debug)]
pub(crate) struct Me {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_dev: Option<String>,
}

impl Me {
    fn record(&self, network: &str, subnet: Ipv4Net) -> NodeRecord {
        NodeRecord {
            name: self.node.clone(),
            underlay_ip: self.underlay_ip,
            underlay_dev: self.underlay_dev.clone(),
            subnets: BTreeMap::from([(network.to_string(), subnet)]),
        }
    }
}

/// What this node has published (re-published under a new lease if the old
/// one is lost). Guarded by an async mutex so publications serialize.
pub(crate) struct Owned {
    pub lease: i64,
    pub subnet: Ipv4Net,
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
}

/// Connection health: logs once per change of state, not per retry.
pub(crate) struct Health {
    lease_ok: AtomicBool,
    watch_ok: AtomicBool,
    reported: Mutex<bool>,
    /// "node NODE, network NET", for the log lines.
    who: String,
}

impl Health {
    fn new(who: String) -> Self {
        Health {
            lease_ok: AtomicBool::new(true),
            watch_ok: AtomicBool::new(true),
            reported: Mutex::new(true),
            who,
        }
    }
    fn connected(&self) -> bool {
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

/// Exponential backoff with a little jitter, capped at [`BACKOFF_CAP`].
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.subsec_nanos() % 50_000_000)
            .unwrap_or(0);
        d + Duration::from_nanos(jitter as u64)
    }
}

/// State shared by the store handle and its background tasks.
pub(crate) struct Inner {
    pub client: Client,
    pub keys: Keys,
    pub me: Me,
    pub ttl_secs: i64,
    describe: String,
    pub owned: tokio::sync::Mutex<Owned>,
    /// Mirrors of `owned.lease` and `owned.subnet` for synchronous readers.
    pub lease_id: AtomicI64,
    subnet: Mutex<Ipv4Net>,
    view: Mutex<View>,
    changes: watch::Sender<u64>,
    pub health: Health,
    pub relists: AtomicU64,
    pub paused: watch::Sender<bool>,
    /// Set when a background task died (a bug): `changed()` then fails.
    failed: AtomicBool,
}

impl Inner {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn network(&self) -> Network {
        self.view().network().clone()
    }

    /// Change the view and notify `changed()` if the derived snapshot changed.
    pub(crate) fn update_view(&self, f: impl FnOnce(&mut View)) {
        let changed = {
            let mut v = self.view();
            f(&mut v);
            v.rebuild().0
        };
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Addresses with a key under `endpoints/` in the view (valid or not).
    pub(crate) fn endpoint_keys(&self) -> std::collections::HashSet<Ipv4Addr> {
        self.view().endpoint_keys()
    }

    pub(crate) fn set_own(&self, subnet: Ipv4Net) {
        *self.subnet.lock().unwrap_or_else(|e| e.into_inner()) = subnet;
        let net = self.network().name;
        let rec = self.me.record(&net, subnet);
        self.update_view(|v| v.set_own(rec));
    }
}

/// Aborts a helper task when dropped (also when the future owning it is cancelled).
pub(crate) struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Marks the store failed if a background task panics.
pub(crate) struct TaskGuard(pub Arc<Inner>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::SeqCst);
            self.0.changes.send_modify(|n| *n += 1);
        }
    }
}

/// A node's membership in one network, kept in etcd.
pub struct EtcdStore {
    inner: Arc<Inner>,
    changes: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl EtcdStore {
    /// Join network `opts.network` as node `opts.node`: claim (or reuse) a
    /// subnet, publish the node record under a lease kept alive in the
    /// background, adopt this node's endpoints left by a previous run, and
    /// start watching. Needs etcd reachable (fails after a few seconds if not).
    pub async fn join(opts: EtcdOptions) -> Result<EtcdStore> {
        opts.validate()?;
        let client = connect(&opts.client_options()).await?;
        let keys = Keys::new(&opts.prefix, &opts.network);
        let net = read_network(&client, &keys, &opts.network).await?.ok_or_else(|| {
            anyhow!(
                "network {} does not exist in etcd (no key {}): create it first (create_network)",
                opts.network,
                keys.config()
            )
        })?;
        let me = Me {
            node: opts.node.clone(),
            underlay_ip: opts.underlay_ip,
            underlay_dev: opts.underlay_dev.clone(),
        };
        session::check_identity_free(&client, &keys, &me, &net).await?;
        let ttl_secs = opts.ttl.as_secs_f64().ceil() as i64;
        let (lease, granted) = session::grant(&client, ttl_secs).await?;
        // Keep the lease alive while joining (a slow join must not lose it).
        let early = AbortOnDrop(tokio::spawn(session::simple_keepalive(
            client.clone(),
            lease,
            granted,
        )));
        let joined = async {
            let subnet = session::claim(&client, &keys, &me, &net, lease, &[]).await?;
            let endpoints = session::adopt_endpoints(&client, &keys, &me, &net, lease).await?;
            let (kvs, rev) = watcher::list(&client, keys.root()).await?;
            Ok::<_, anyhow::Error>((subnet, endpoints, kvs, rev))
        }
        .await;
        drop(early);
        let (subnet, endpoints, kvs, rev) = match joined {
            Ok(j) => j,
            Err(e) => {
                let _ = op("revoke lease", client.lease_client().revoke(lease)).await;
                return Err(e.context(format!(
                    "join network {} as node {}",
                    opts.network, opts.node
                )));
            }
        };
        tracing::info!(
            network = %net.name, node = %me.node, %subnet, lease, adopted_endpoints = endpoints.len(),
            "joined network through etcd"
        );
        let mut view = View::new(keys.clone(), net.clone());
        view.set_own(me.record(&net.name, subnet));
        view.reset(kvs);
        view.rebuild();
        let (changes, rx) = watch::channel(0u64);
        let describe = format!(
            "etcd {} {} (node {})",
            opts.endpoints.join(","),
            keys.root(),
            me.node
        );
        let inner = Arc::new(Inner {
            client,
            keys,
            me,
            ttl_secs,
            describe,
            owned: tokio::sync::Mutex::new(Owned {
                lease,
                subnet,
                endpoints,
            }),
            lease_id: AtomicI64::new(lease),
            subnet: Mutex::new(subnet),
            view: Mutex::new(view),
            changes,
            health: Health::new(format!("node {}, network {}", opts.node, opts.network)),
            relists: AtomicU64::new(0),
            paused: watch::channel(false).0,
            failed: AtomicBool::new(false),
        });
        let tasks = vec![
            tokio::spawn(session::keepalive_loop(inner.clone(), granted)),
            tokio::spawn(watcher::watch_loop(inner.clone(), rev)),
        ];
        Ok(EtcdStore {
            inner,
            changes: rx,
            tasks,
        })
    }

    pub fn node(&self) -> &str {
        &self.inner.me.node
    }

    /// The network's current config.
    pub fn network(&self) -> Network {
        self.inner.network()
    }

    /// The subnet (routed) or address slice (bridged) this node holds.
    pub fn subnet(&self) -> Ipv4Net {
        *self.inner.subnet.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease this node's records are bound to (changes if it is re-granted).
    pub fn lease_id(&self) -> i64 {
        self.inner.lease_id.load(Ordering::SeqCst)
    }

    /// Whether etcd currently answers (lease kept alive and watch live).
    /// While false, [`Store::snapshot`] serves the last known view.
    pub fn connected(&self) -> bool {
        self.inner.health.connected()
    }

    /// Graceful leave: revoke the lease, which deletes this node's record,
    /// claim and endpoints at once; peers drop it immediately.
    pub async fn leave(mut self) -> Result<()> {
        self.stop_tasks();
        let owned = self.inner.owned.lock().await;
        op(
            format!("revoke lease {}", owned.lease),
            self.inner.client.lease_client().revoke(owned.lease),
        )
        .await
        .map_err(|e| e.context("leave: the records will expire with the lease TTL instead"))?;
        tracing::info!(node = %self.inner.me.node, network = %self.inner.keys.root(), "left the network");
        Ok(())
    }

    /// Stop without revoking the lease, as `kill -9` would: the records stay
    /// until the lease expires (TTL). Dropping the store does the same.
    pub fn crash(mut self) {
        self.stop_tasks();
    }

    fn stop_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Bridged networks: allocate a free address network-wide (CAS on
    /// `endpoints/IP`) and publish it under this node's lease. `ip_hint` is
    /// tried first (if this node already holds it, that endpoint is
    /// returned); then addresses from this node's slice onwards, wrapping
    /// around the cidr, skipping the network and broadcast addresses.
    pub async fn allocate_endpoint(
        &self,
        ip_hint: Option<Ipv4Addr>,
        mac_from_ip: fn(Ipv4Addr) -> Mac,
    ) -> Result<Endpoint> {
        session::allocate_endpoint(&self.inner, ip_hint, mac_from_ip).await
    }

    /// Withdraw an endpoint of this node (idempotent: absent, or now held by
    /// another node after a migration, is fine and deletes nothing).
    pub async fn release_endpoint(&self, ip: Ipv4Addr) -> Result<()> {
        session::release_endpoint(&self.inner, ip).await
    }

    /// Publish an endpoint with a given address on this node (re-attach after
    /// a migration). Allowed if the address is free or already this node's;
    /// an error names the node that holds it otherwise.
    pub async fn publish_endpoint(&self, ep: Endpoint) -> Result<()> {
        session::publish_endpoint(&self.inner, ep).await
    }

    /// The endpoints this node publishes (including ones adopted at join
    /// from a previous run: release those whose container is gone).
    pub async fn own_endpoints(&self) -> Vec<Endpoint> {
        self.inner
            .owned
            .lock()
            .await
            .endpoints
            .values()
            .cloned()
            .collect()
    }

    /// Test hook: how many times the watcher re-listed (after compaction).
    #[doc(hidden)]
    pub fn relist_count(&self) -> u64 {
        self.inner.relists.load(Ordering::SeqCst)
    }

    /// Test hook: pause the watcher (drops its watch stream) or resume it.
    #[doc(hidden)]
    pub fn pause_watch(&self, paused: bool) {
        self.inner.paused.send_replace(paused);
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

impl Store for EtcdStore {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    async fn snapshot(&mut self) -> Result<Snapshot> {
        self.changes.borrow_and_update();
        Ok(self.inner.view().snapshot().clone())
    }

    async fn changed(&mut self) -> Result<()> {
        if self.changes.has_changed().unwrap_or(false) {
            return self.check_failed();
        }
        self.changes
            .changed()
            .await
            .map_err(|_| anyhow!("etcd store closed"))?;
        self.check_failed()
    }
}

impl EtcdStore {
    fn check_failed(&self) -> Result<()> {
        if self.inner.failed.load(Ordering::SeqCst) {
            bail!("a background task of the etcd store died (see the panic message above)");
        }
        Ok(())
    }
}

/// Mode check shared by the endpoint operations.
pub(crate) fn require_bridged(net: &Network) -> Result<()> {
    if net.mode != Mode::Bridged {
        bail!(
            "network {} is {}: endpoints are published only for bridged networks (routed containers get addresses from the node's subnet)",
            net.name,
            net.mode
        );
    }
    Ok(())
}
