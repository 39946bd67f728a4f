//! A throwaway etcd server for tests: `/usr/bin/etcd` on 127.0.0.1 only, on
//! free ports, with a temporary data dir. Killed and removed on drop (also
//! when a test panics); `stop()`/`start()` restart it on the same data dir
//! and ports to simulate outages. [`TlsFiles`] makes a throwaway CA, server
//! and client certificate (openssl CLI) for a TLS server.
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

const ETCD: &str = "/usr/bin/etcd";

#[path = "../common/naming.rs"]
mod naming;
pub mod store;

pub use naming::unique_ns;

pub struct EtcdServer {
    dir: tempfile::TempDir,
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tls: Option<TlsFiles>,
    certs: Option<tempfile::TempDir>,
}

/// PEM files of a throwaway CA, a server certificate for 127.0.0.1 and a
/// client certificate (CN `vxmesh-client`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TlsFiles {
    pub fn generate(dir: &std::path::Path) -> TlsFiles {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=vxmesh-test-ca",
        ]);
        ca.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &ca);
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "vxmesh-client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            let (key, csr, crt, extf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let subj = format!("/CN={cn}");
            let mut req = vec!["req"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(dir, &req);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &extf,
                ],
            );
        }
        TlsFiles {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        }
    }

    pub fn client_tls(&self) -> TlsOptions {
        let read = |p: &PathBuf| std::fs::read(p).expect("read PEM");
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)))
            .identity(Identity::from_pem(
                read(&self.client_cert),
                read(&self.client_key),
            ))
    }
}

/// Two distinct free ports on 127.0.0.1 (bind port 0, read, release).
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

impl EtcdServer {
    /// Start a fresh single-member etcd and wait until it answers.
    pub async fn start() -> EtcdServer {
        Self::start_with(None).await
    }

    /// Serve clients over TLS only (client certificates required), with
    /// certificates made in the server's temp dir.
    pub async fn start_tls() -> (EtcdServer, TlsFiles) {
        let certs = tempfile::Builder::new()
            .prefix("vxmesh-etcd-tls-")
            .tempdir()
            .expect("temp dir");
        let files = TlsFiles::generate(certs.path());
        let mut srv = Self::start_with(Some(files.clone())).await;
        srv.certs = Some(certs); // removed with the server
        (srv, files)
    }

    async fn start_with(tls: Option<TlsFiles>) -> EtcdServer {
        let name = unique_ns("test-");
        for attempt in 0..3 {
            let (client_port, peer_port) = free_ports();
            let mut s = EtcdServer {
                dir: tempfile::Builder::new()
                    .prefix("vxmesh-etcd-")
                    .tempdir()
                    .expect("temp dir"),
                name: name.clone(),
                client_port,
                peer_port,
                child: None,
                tls: tls.clone(),
                certs: None,
            };
            s.spawn();
            match s.wait_ready(Duration::from_secs(15)).await {
                Ok(()) => return s,
                // Another process took a port between probing and binding: retry.
                Err(e) if attempt < 2 => {
                    eprintln!("etcd did not start ({e}); retrying on other ports")
                }
                Err(e) => panic!("etcd did not start: {e}\n{}", s.log_tail()),
            }
        }
        unreachable!()
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn connect_options(&self) -> Option<ConnectOptions> {
        self.tls
            .as_ref()
            .map(|t| ConnectOptions::new().with_tls(t.client_tls()))
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// How many requests of gRPC method `method` (`Range`, `Txn`, ...) this
    /// member has received, from its own `/metrics` (plain HTTP only).
    pub async fn requests(&self, method: &str) -> u64 {
        self.grpc_counter("grpc_server_msg_received_total", method)
            .await
    }

    /// How many streams or calls of gRPC method `method` this member has
    /// started (a keep-alive stream counts once, however many renewals it
    /// carries).
    pub async fn started(&self, method: &str) -> u64 {
        self.grpc_counter("grpc_server_started_total", method).await
    }

    /// Stop (SIGSTOP) or continue (SIGCONT) the etcd process: a member that
    /// keeps its connections but answers nothing, like an overloaded one.
    pub fn freeze(&self, frozen: bool) {
        use nix::sys::signal::{Signal, kill};
        let pid = self.child.as_ref().expect("etcd is running").id();
        let sig = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal etcd");
    }

    async fn grpc_counter(&self, name: &str, method: &str) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        assert!(self.tls.is_none(), "{name}: plain HTTP members only");
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.client_port))
            .await
            .expect("connect to etcd's /metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("ask etcd's /metrics");
        let mut body = String::new();
        s.read_to_string(&mut body)
            .await
            .expect("read etcd's /metrics");
        let series = format!("{name}{{");
        let label = format!("grpc_method=\"{method}\"");
        body.lines()
            .filter(|l| l.starts_with(&series) && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let mut cmd = Command::new(ETCD);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .arg("--initial-cluster")
            .arg(format!("{}={peer}", self.name))
            .args(["--initial-cluster-state", "new", "--initial-cluster-token"])
            .arg(&self.name)
            .args(["--auto-compaction-retention", "0"]);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        // If the test process dies without unwinding, take etcd with it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {ETCD} ({e}): install it (Debian package etcd-server)")
        });
        self.child = Some(child);
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("etcd exited with {status}"));
            }
            if let Ok(Ok(mut c)) = tokio::time::timeout(
                Duration::from_secs(1),
                Client::connect(self.endpoints(), self.connect_options()),
            )
            .await
                && let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(1), c.get("health-probe", None)).await
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("etcd did not answer within {timeout:?}"))
    }

    /// Kill the server (the data dir and ports are kept).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restart a stopped server on the same data dir and ports.
    pub async fn start_again(&mut self) {
        self.spawn();
        if let Err(e) = self.wait_ready(Duration::from_secs(15)).await {
            panic!("etcd did not restart: {e}\n{}", self.log_tail());
        }
    }

    /// A raw client, to inject or inspect keys.
    pub async fn client(&self) -> Client {
        Client::connect(self.endpoints(), self.connect_options())
            .await
            .expect("connect to the test etcd")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        // The TempDir field removes the data dir after this.
    }
}
