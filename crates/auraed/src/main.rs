//! The `auraed` binary: parse the config, start logging, run the daemon.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // A cell's namespace holder is this binary re-executed; it must not
    // start a runtime or parse flags.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == auraed::host::spawn::HOLDER_ARG)
    {
        auraed::host::spawn::holder::main();
    }
    let config = auraed::Config::parse();
    let logs = auraed::logging::init(config.log_level());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("auraed: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(auraed::run(config, logs, auraed::shutdown_on_signals())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", aurae_client::error_chain(&e));
            eprintln!("auraed: {}", aurae_client::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
