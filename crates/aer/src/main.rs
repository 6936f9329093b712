//! aer: the command-line client for Aurae nodes. A thin layer over
//! `aurae-client`: one module per service, each a clap subcommand.

mod cell;
mod discovery;
mod health;
mod observe;
mod vm;

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
    /// Cells: allocate, free, start, stop, list.
    #[command(subcommand)]
    Cell(cell::Command),
    /// Observe: the daemon's log, an executable's output, POSIX signals.
    #[command(subcommand)]
    Observe(observe::Command),
    /// VMs: create, start, stop, free, list.
    #[command(subcommand)]
    Vm(vm::Command),
}

/// What a command failed with: one readable sentence.
pub struct Failure(String);

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(error_chain(&e))
    }
}

/// Turns a gRPC status into one readable sentence.
pub fn status(s: tonic::Status) -> Failure {
    Failure(format!("{:?}: {}", s.code(), s.message()))
}

fn main() -> ExitCode {
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
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("aer: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let mut config = ClientConfig::load(cli.config.as_deref())?;
    if let Some(socket) = cli.socket {
        config.system.socket = socket;
    }
    let client = Client::connect(&config).await?;
    match cli.command {
        Command::Discover => discovery::discover(&client, cli.json).await,
        Command::Health(args) => health::check(&client, args, cli.json).await,
        Command::Cell(cmd) => cell::run(&client, cmd, cli.json).await,
        Command::Observe(cmd) => observe::run(&client, cmd, cli.json).await,
        Command::Vm(cmd) => vm::run(&client, cmd, cli.json).await,
    }
}
