//! Documentation generated from the clap definitions themselves, so it can
//! never drift from the flags: `vxmesh completions SHELL` prints a shell
//! completion script, and the hidden `vxmesh man DIR` writes the man pages
//! (`vxmesh.1` and one `vxmesh-COMMAND.1` per command and subcommand) that
//! scripts/package.sh puts into the Debian package.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Command};
use clap_complete::Shell;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// The directory to write the pages to (created when missing).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// Print the completion script of `cmd` for the asked shell.
pub fn completions(a: CompletionsArgs, mut cmd: Command) -> Result<()> {
    let name = cmd.get_name().to_string();
    // Rendered first: clap_complete panics on a write error (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, name, &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("write the completion script")
}

/// Write the man pages of `cmd` and its visible subcommands into the directory.
pub fn man(a: ManArgs, cmd: Command) -> Result<()> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("create {}", a.dir.display()))?;
    clap_mangen::generate_to(cmd, &a.dir)
        .with_context(|| format!("write man pages into {}", a.dir.display()))?;
    Ok(())
}
