//! The `auraed` binary: parse the config, start logging, run the daemon.
//! As a machine's init (PID 1 or `--init`) it first brings the system up
//! and, whatever happens, powers the machine off instead of exiting.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Man pages and completions for the package build (see docs.rs).
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == auraed::docs::DOCS_ARG) {
        let dir = args.next().unwrap_or_else(|| ".".into());
        return match auraed::docs::generate(std::path::Path::new(&dir)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "auraed: cannot write docs to {}: {e}",
                    dir.to_string_lossy()
                );
                std::process::ExitCode::FAILURE
            }
        };
    }
    // A cell's namespace holder is this binary re-executed; it must not
    // start a runtime or parse flags.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == auraed::host::spawn::HOLDER_ARG)
    {
        auraed::host::spawn::holder::main();
    }
    // So is an executable's shim (when `aurae-shim` is not installed).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == auraed::host::shim::SHIM_ARG)
    {
        auraed::host::shim::main();
    }
    // And a CRI container's monitor (see cri::container::crun).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == auraed::cri::container::MONITOR_ARG)
    {
        auraed::cri::container::monitor_main();
    }
    let pid1 = auraed::init::is_pid1();
    let mut config = if pid1 {
        // The kernel hands init every command-line word it does not know
        // (e.g. `quiet`) as an argument: flags cannot come from there.
        match auraed::Config::try_parse_from(["auraed", "--init"]) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("auraed: {e}");
                auraed::init::power_off();
            }
        }
    } else {
        auraed::Config::parse()
    };
    if let Some(auraed::config::Command::Pki(cmd)) = &config.command {
        return auraed::authz::issue::main(cmd);
    }
    let init = pid1 || config.init;
    if init && config.socket == auraed::config::DEFAULT_SOCKET {
        config.socket = auraed::config::DEFAULT_INIT_LISTEN.to_owned();
    }
    let logs = auraed::logging::init(config.log_level());
    if pid1 {
        auraed::init::install_panic_hook();
    }
    if init {
        auraed::init::bring_up(&config);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("auraed: cannot start the async runtime: {e}");
            return finish(pid1, std::process::ExitCode::FAILURE);
        }
    };
    let result = runtime.block_on(async {
        if pid1 {
            tokio::spawn(auraed::host::spawn::reaper::run());
        }
        let shutdown = async {
            tokio::select! {
                () = auraed::shutdown_on_signals() => {}
                () = auraed::init::power_button(), if init => {}
            }
        };
        auraed::run(config, logs, shutdown).await
    });
    let code = match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", aurae_client::error_chain(&e));
            eprintln!("auraed: {}", aurae_client::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    };
    // Tasks still running (the reaper) must not keep us from powering off.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    finish(pid1, code)
}

/// PID 1 must not exit: the kernel would panic.
fn finish(pid1: bool, code: std::process::ExitCode) -> std::process::ExitCode {
    if pid1 {
        auraed::init::power_off();
    }
    code
}
