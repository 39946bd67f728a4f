//! One module per command group, each turning its clap arguments into calls
//! of the library (`vxmesh`) or the lab crate (`vxmesh-lab`), plus the
//! arguments several groups share.

pub mod agent;
pub mod attach;
pub mod bench;
pub mod cluster;
pub mod docker;
pub mod docs;
pub mod keys;
pub mod lab;
pub mod leave;
pub mod net;
pub mod node;
pub mod rotate;

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use vxmesh::config::Mode;
use vxmesh::store::open::EtcdLogin;

/// Where the etcd store is and how to log in.
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// The etcd store: etcd://HOST:2379[,HOST2:2379] (TLS when --etcd-ca is given).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Key prefix in etcd.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// CA certificate of the etcd servers (PEM): connect with TLS.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), when etcd requires client certificates.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user, when etcd has authentication enabled.
    #[arg(long, value_name = "USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The library's view of these options.
    pub fn login(&self) -> EtcdLogin {
        EtcdLogin {
            store: self.store.clone(),
            prefix: self.prefix.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password_file: self.etcd_password_file.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    Routed,
    Bridged,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Routed => Mode::Routed,
            ModeArg::Bridged => Mode::Bridged,
        }
    }
}
