//! Man pages and shell completions, generated from the real clap
//! definitions by `auraed __generate-docs DIR` (a hidden mode, like the
//! holder's and the shim's: it is no flag of the daemon, so it shows up in
//! neither `--help`, nor the man page, nor the completions). The Debian
//! package build (`scripts/deb`) runs it; nothing else does.
//!
//! Writes `DIR/man/*.8` (auraed, and short pages for its two helper
//! programs, which are installed next to it) and
//! `DIR/completions/{auraed.bash,_auraed,auraed.fish}`.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

/// `auraed __generate-docs DIR`.
pub const DOCS_ARG: &str = "__generate-docs";

/// Man pages go to section 8 (system administration: a daemon run by root).
const SECTION: &str = "8";

/// Writes the man pages and completions under `dir`.
pub fn generate(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut cmd = crate::Config::command();
    cmd.build();
    write_man(&cmd, &man)?;
    for helper in helpers() {
        clap_mangen::Man::new(helper)
            .section(SECTION)
            .generate_to(&man)?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "auraed", &completions)?;
    }
    Ok(())
}

/// The page of `cmd` and of each of its visible subcommands (if any).
fn write_man(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man(sub, dir)?;
    }
    clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .generate_to(dir)?;
    Ok(())
}

/// The helper programs have no flags of their own; their pages say what
/// they are, so that nobody runs them by hand.
fn helpers() -> [clap::Command; 2] {
    [
        clap::Command::new("aurae-holder")
            .version(crate::VERSION)
            .about("Holds the namespaces of an isolated auraed cell (internal)")
            .long_about(
                "aurae-holder is started by auraed(8), once per cell that has its own \
                 namespaces: it keeps them alive while the cell exists, also while auraed \
                 is restarted. It is not meant to be run by hand; auraed looks for it next \
                 to its own executable.",
            ),
        clap::Command::new("aurae-shim")
            .version(crate::VERSION)
            .about("Supervises one executable of auraed (internal)")
            .long_about(
                "aurae-shim is started by auraed(8), once per executable: it is the \
                 executable's parent, keeps its stdout and stderr in size-capped files and \
                 records its exit, so that executables outlive a restart of auraed. It is \
                 not meant to be run by hand; auraed looks for it next to its own \
                 executable.",
            ),
    ]
}
