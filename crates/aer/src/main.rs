//! aer: the command-line client for Aurae nodes. A thin layer over
//! `aurae-client`: one module per service, each a clap subcommand.

mod cell;
mod discovery;
mod docs;
mod health;
mod observe;
mod run;
mod vm;

/// `aer cell stats` and `aer top`.
mod stats;

use std::{path::PathBuf, process::ExitCode};

use aurae_client::{error_chain, Client, ClientConfig};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "aer", version, about = "Command-line client for Aurae nodes")]
struct Cli {
    /// Client config (TOML). Default: $AURAE_CONFIG, ~/.aurae/config,
    /// /etc/aurae/config, /var/lib/aurae/config, first that exists.
    #[arg(long, global = true)]
    config: Option<PathBuf>,

    /// Override the config's [system] socket (a path, or IP:PORT for TCP).
    #[arg(long, global = true)]
    socket: Option<String>,

    /// Print JSON instead of readable lines.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Is this a healthy Aurae node, and which version?
    Discover,
    /// Query the standard gRPC health service.
    Health(health::Args),
    /// Cells: allocate, free, start, run, stop, wait, list.
    #[command(subcommand)]
    Cell(cell::Command),
    /// Observe: the daemon's log, an executable's output, POSIX signals.
    #[command(subcommand)]
    Observe(observe::Command),
    /// VMs: create, start, stop, free, list.
    #[command(subcommand)]
    Vm(vm::Command),
    /// Cells' resource usage, refreshed (like systemd-cgtop).
    Top(stats::TopArgs),
}

/// What a command failed with: one readable sentence (printed as
/// `aer: SENTENCE`), and the exit code, 1 unless the command chose another.
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }

    /// The same failure, exiting with `code` instead of 1.
    pub fn with_code(self, code: u8) -> Self {
        Self { code, ..self }
    }
}

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::new(error_chain(&e))
    }
}

/// Turns a gRPC status into one readable sentence.
pub fn status(s: tonic::Status) -> Failure {
    Failure::new(format!("{:?}: {}", s.code(), s.message()))
}

fn main() -> ExitCode {
    // Man pages and completions for the package build (see docs.rs).
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == docs::DOCS_ARG) {
        let dir = PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
        return match docs::generate(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("aer: cannot write docs to {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(Failure { message, code }) => {
            eprintln!("aer: {message}");
            ExitCode::from(code)
        }
    }
}

/// Runs the command; `Ok` carries the exit code of a command that succeeded
/// in doing its job (0, or what `aer cell wait` reports about an executable).
async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    let mut config = ClientConfig::load(cli.config.as_deref())?;
    if let Some(socket) = cli.socket {
        config.system.socket = socket;
    }
    let client = Client::connect(&config).await?;
    match cli.command {
        Command::Discover => discovery::discover(&client, cli.json).await.map(|()| 0),
        Command::Health(args) => health::check(&client, args, cli.json).await.map(|()| 0),
        Command::Cell(cmd) => cell::run(&client, cmd, cli.json).await,
        Command::Observe(cmd) => observe::run(&client, cmd, cli.json).await.map(|()| 0),
        Command::Vm(cmd) => vm::run(&client, cmd, cli.json).await.map(|()| 0),
        Command::Top(args) => stats::top(&client, args, cli.json).await,
    }
}
