//! Man pages and shell completions, generated from the real clap
//! definitions by `aer __generate-docs DIR` (hidden: not a subcommand, so
//! it shows up in neither `--help`, nor the man pages, nor the
//! completions). The Debian package build (`scripts/deb`) runs it.
//!
//! Writes `DIR/man/aer.1` and a page per subcommand (`aer-cell-run.1`, …),
//! and `DIR/completions/{aer.bash,_aer,aer.fish}`.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

/// `aer __generate-docs DIR`.
pub const DOCS_ARG: &str = "__generate-docs";

pub fn generate(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // One page per (sub)command, section 1, named aer-cell-run.1 etc.
    clap_mangen::generate_to(crate::Cli::command(), &man)?;
    let mut cmd = crate::Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "aer", &completions)?;
    }
    Ok(())
}
