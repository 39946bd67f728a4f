//! `vxmesh net`: create, show and delete networks in the etcd store.

use anyhow::Result;
use clap::Subcommand;
use vxmesh::config::{self, Mode};
use vxmesh::secure::config::EncryptionFile;
use vxmesh::store::etcd;

use super::{EtcdArgs, ModeArg};

#[derive(Subcommand, Debug)]
pub enum NetCmd {
    /// Create a network in etcd (validated like a cluster file's network;
    /// an identical existing one is fine, a different one is refused).
    Create {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// routed: cluster CIDR; bridged: the segment's subnet.
        #[arg(long)]
        cidr: String,
        #[arg(long, value_enum, default_value = "routed")]
        mode: ModeArg,
        #[arg(long)]
        vni: u32,
        /// routed: per-node subnet length (default 24); bridged: per-node address slice (default 28).
        #[arg(long)]
        subnet_len: Option<u8>,
        #[arg(long, default_value_t = 4789)]
        port: u32,
        /// Overlay MTU (default: underlay MTU - 50).
        #[arg(long)]
        mtu: Option<u32>,
        /// Bridged networks: a distributed gateway on every node's bridge,
        /// `true` (the cidr's first host address) or its address.
        #[arg(long, value_name = "true|A.B.C.D")]
        gateway: Option<String>,
        /// Masquerade the containers' traffic to destinations outside every
        /// vxmesh network to the node's address (false: keep their source).
        #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
        outbound_nat: bool,
        /// Carry the network over the secure underlay (VXLAN inside
        /// WireGuard between nodes; every node's key is in its record;
        /// docs/encryption.md).
        #[arg(long)]
        encrypt: bool,
        /// With --encrypt: the secure underlay's transport range, from
        /// which every node's tunnel address is derived (default
        /// 10.255.0.0/16; every encrypted network shares one).
        #[arg(long, value_name = "CIDR", requires = "encrypt")]
        transport_cidr: Option<String>,
        /// With --encrypt: the UDP port of the WireGuard tunnels (default
        /// 51820; every encrypted network shares one).
        #[arg(long, value_name = "PORT", requires = "encrypt")]
        wg_port: Option<u32>,
    },
    /// Print a network's config (JSON).
    Show {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete a network and everything under it (refused while nodes are in it).
    Delete {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

pub async fn run(cmd: NetCmd) -> Result<()> {
    match cmd {
        NetCmd::Create {
            name,
            etcd: e,
            cidr,
            mode,
            vni,
            subnet_len,
            port,
            mtu,
            gateway,
            outbound_nat,
            encrypt,
            transport_cidr,
            wg_port,
        } => {
            let mode: Mode = mode.into();
            let file = config::NetworkFile {
                name,
                mode,
                cidr,
                subnet_len: subnet_len.unwrap_or(if mode == Mode::Bridged { 28 } else { 24 }),
                vni,
                port,
                mtu,
                gateway: gateway.map(|g| match g.as_str() {
                    "true" => config::GatewayFile::Enabled(true),
                    "false" => config::GatewayFile::Enabled(false),
                    _ => config::GatewayFile::Address(g),
                }),
                outbound_nat,
                encrypt,
            };
            let net = etcd::validate_network(&file)?;
            let login = e.login();
            let settings =
                (transport_cidr.is_some() || wg_port.is_some()).then_some(EncryptionFile {
                    transport_cidr,
                    port: wg_port,
                });
            let client = login.client()?;
            etcd::create_network(&client, &login.prefix(), &net, settings.as_ref()).await?;
            let secure = if net.encrypt {
                let e = etcd::get_encryption(&client, &login.prefix(), &net.name)
                    .await?
                    .unwrap_or_default();
                format!(", encrypted: transport {}, port {}", e.transport, e.port)
            } else {
                String::new()
            };
            let gw = net
                .gateway
                .map(|g| format!(", gateway {g}"))
                .unwrap_or_default();
            println!(
                "network {} ({}, cidr {}, /{} per node, VNI {}{gw}, outbound NAT {}{secure}) is in etcd",
                net.name,
                net.mode,
                net.cidr,
                net.subnet_len,
                net.vni,
                if net.outbound_nat { "on" } else { "off" },
            );
        }
        NetCmd::Show { name, etcd: e } => {
            let login = e.login();
            let client = login.client()?;
            match etcd::get_network(&client, &login.prefix(), &name).await? {
                Some(n) if n.encrypt => {
                    // With the secure underlay's settings, as a cluster
                    // file's `[encryption]` table writes them.
                    let e = etcd::get_encryption(&client, &login.prefix(), &name)
                        .await?
                        .unwrap_or_default();
                    let mut v = serde_json::to_value(&n)?;
                    v["encryption"] = serde_json::to_value(EncryptionFile::from(&e))?;
                    println!("{}", serde_json::to_string_pretty(&v)?)
                }
                Some(n) => println!("{}", serde_json::to_string_pretty(&n)?),
                None => anyhow::bail!("network {name} does not exist in etcd"),
            }
        }
        NetCmd::Delete { name, etcd: e } => {
            let login = e.login();
            etcd::delete_network(&login.client()?, &login.prefix(), &name).await?;
            println!("network {name} deleted");
        }
    }
    Ok(())
}
