//! The secure underlay (issue 16, docs/encryption.md): VXLAN of networks
//! with `encrypt = true` carried over per-peer WireGuard tunnels (boringtun
//! in userspace) behind the TUN device `vxm-wg0`.

pub mod config;
pub mod datapath;
pub mod gro;
pub mod gso;
pub mod keys;
pub mod peers;
pub mod plan;
pub mod sendq;
pub mod transport;
pub mod tun;
pub mod udp;
pub mod underlay;

pub use datapath::DataPath;
pub use keys::{KeyError, ListedKeys, PrivateKey, PublicKey};
pub use peers::{PeerChanges, PeerSpec, PeerStats, PeerTable, SwitchProgress};
pub use transport::TransportError;
pub use tun::{Tun, TunError};
pub use underlay::{SecureError, SecureUnderlay};
