//! `vxmesh keygen`: a WireGuard key pair for the secure underlay.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use vxmesh::secure::keys::{PrivateKey, write_key_file};

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Write the private key to FILE (mode 0600; refused if FILE exists).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Write a new private key and print its public key (the node's
/// `public_key` in the cluster file).
pub fn keygen(a: KeygenArgs) -> Result<()> {
    let key = PrivateKey::generate()?;
    write_key_file(&a.out, &key)?;
    println!("{}", key.public());
    Ok(())
}
