//! `vxmesh rotate-key`: start a rotation of this node's secure-underlay
//! key: a new key in the state dir, its public key printed, the agent woken
//! (it publishes the key in etcd, or waits for the cluster file to list it,
//! then switches without a lost packet; docs/encryption.md).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use vxmesh::secure::keys::{self, NEXT_KEY_FILE, PrivateKey};

#[derive(Args, Debug)]
pub struct RotateKeyArgs {
    /// The agent's state directory (where the next key is written).
    #[arg(long, value_name = "DIR", default_value = vxmesh::state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// Write `STATE_DIR/wg.next.key` (0600), print its public key on stdout
/// and what to do next on stderr, and wake the agent.
pub fn rotate_key(a: RotateKeyArgs) -> Result<()> {
    let path = a.state_dir.join(NEXT_KEY_FILE);
    if let Some(pending) = keys::read_next(&a.state_dir)? {
        bail!(
            "a rotation is under way already: its next key {} is in {} (the file goes when the agent has switched); \
             list it as the node's next_public_key (cluster file), or remove the file to start over",
            pending.public(),
            path.display()
        );
    }
    if !a.state_dir.is_dir() {
        bail!(
            "state dir {} does not exist: give the agent's --state-dir",
            a.state_dir.display()
        );
    }
    let key = PrivateKey::generate()?;
    keys::write_key_file(&path, &key)?;
    println!("{}", key.public());
    let woken = vxmesh::wake::poke(&a.state_dir);
    eprintln!(
        "next key written to {} (mode 0600).\n\
         etcd store: the agent lists it in its records beside the old key, switches, then lists the new key alone.\n\
         cluster file: add next_public_key = \"{}\" to this node; once {} is gone (the agent switched), \
         make it the node's public_key and remove next_public_key.{}",
        path.display(),
        key.public(),
        path.display(),
        if woken {
            ""
        } else {
            "\nno agent listens on this state dir now: the rotation starts when it runs."
        }
    );
    Ok(())
}
