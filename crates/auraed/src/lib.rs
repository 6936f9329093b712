//! auraed: the Aurae node daemon.
//!
//! `run()` does the work (mini-redis style, so tests and `main` share it):
//! make sure a PKI exists, bind the listener, detect the kernel backends
//! once, build the services and serve until shut down, then tear down
//! everything the daemon created.
//!
//! Layout: `services/` turns gRPC into domain calls (one module per
//! service); `host/` is the kernel-facing code and never imports tonic.

pub mod authz;
pub mod config;
pub mod cri;
mod decode_status;
pub mod docs;
pub mod error;
pub mod host;
mod inflight;
pub mod init;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod services;
pub mod systemd;

use std::{future::Future, sync::Arc, time::Duration};

use aurae_client::Target;
use aurae_proto::{
    cells::cell_service_server::CellServiceServer,
    discovery::discovery_service_server::DiscoveryServiceServer,
    observe::observe_service_server::ObserveServiceServer, vms::vm_service_server::VmServiceServer,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

pub use config::Config;
pub use error::DaemonError;
use listener::Listener;
use logging::LogBus;

/// The daemon's version, reported by Discover.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The fully qualified names of our services, for grpc.health.
const SERVICE_NAMES: [&str; 4] = [
    "aurae.discovery.v0.DiscoveryService",
    "aurae.cells.v0.CellService",
    "aurae.observe.v0.ObserveService",
    "aurae.vms.v0.VmService",
];

/// Runs the daemon until `shutdown` completes, then stops cleanly.
pub async fn run(
    config: Config,
    logs: Arc<LogBus>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    if let Some((old, new)) = host::rlimit::raise_nofile() {
        if new > old {
            tracing::debug!("open-file limit raised from {old} to {new}");
        }
    }
    // Before anything else: a policy that does not parse stops start-up.
    let authz = Arc::new(authz::Authorizer::new(config.authz_policy.as_deref())?);
    pki::ensure(&config)?;
    let tls = listener::tls_config(&config)?;
    let target = Target::parse(&config.socket);
    let listener = Listener::bind(&target).await?;

    let cgroups =
        host::cgroup::detect_host(config.cgroup_root.as_deref()).map_err(DaemonError::Cgroup)?;
    tracing::info!(
        "cgroup backend: {}; {}",
        if cgroups.is_v2() { "v2" } else { "v1 (hybrid)" },
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| host::cgroup::favordynmods_report(&m))
            .unwrap_or_default()
    );
    let output_dir = config.library_dir.join("output");
    let store =
        services::cells::persist::Store::open(&config.runtime_dir, &output_dir).map_err(|e| {
            DaemonError::State {
                path: config.runtime_dir.join("state"),
                source: e,
            }
        })?;
    warn_if_tmpfs(store.output_root(), config.output_cap);
    let cells = Arc::new(services::cells::Cells::new(
        cgroups,
        store,
        Duration::from_secs(config.stop_grace_secs),
        config.output_cap,
    ));
    cells.adopt().await;
    // A machine's init stops its workloads before powering off, whatever
    // the flag says: nothing could re-adopt them.
    let on_exit = if config.init || init::is_pid1() {
        services::cells::OnExit::Free
    } else {
        config.on_exit
    };

    // Loading the probe takes a while (BTF, verifier): it happens in the
    // background so that start-up does not wait for it. Without BPF the
    // daemon serves everything else; the signal stream then answers
    // UNAVAILABLE with the reason.
    let signals = services::observe::SignalSource::load_in_background();
    let accel = host::hypervisor::detect_accel(&config.vm_accel)?;
    let qemu = host::hypervisor::qemu::Qemu::locate(config.qemu.as_deref());
    let vms = Arc::new(services::vms::Vms::new(
        Arc::new(qemu),
        cells.clone(),
        services::vms::VmSettings {
            runtime_dir: config.runtime_dir.clone(),
            ca_crt: config.ca_crt.clone(),
            accel,
            boot_timeout: Duration::from_secs(config.vm_boot_timeout_secs),
            stop_timeout: Duration::from_secs(config.vm_stop_timeout_secs),
        },
    ));

    let token = CancellationToken::new();
    // Whatever path leaves this function, stop accepting (and remove the
    // socket file, which the accept task owns).
    let _stop_accepting = token.clone().drop_guard();

    let rpc_metrics = metrics::rpc_metrics();
    if let Some(addr) = config.metrics_listen {
        let (c, s) = (cells.clone(), signals.clone());
        metrics::start(addr, &rpc_metrics, c, s, token.child_token()).await?;
    }
    // The Kubernetes CRI on a socket of its own, if enabled.
    let cri = match cri::CriSettings::from_config(&config) {
        Some(settings) => Some(cri::start(settings, cells.clone(), token.child_token()).await?),
        None => None,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICE_NAMES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(aurae_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(DaemonError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(DaemonError::Reflection)?;

    if authz.path().is_some() {
        authz::reload_on_sighup(&authz, token.clone());
    }

    let inflight = inflight::InFlight::default();
    let router = Server::builder()
        .layer(rpc_metrics)
        .layer(inflight.clone())
        .layer(decode_status::DecodeStatusLayer)
        .layer(authz::AuthzLayer(authz.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(DiscoveryServiceServer::new(services::discovery::Discovery))
        .add_service(CellServiceServer::new(
            services::cells::CellServiceImpl::new(cells.clone()),
        ))
        .add_service(ObserveServiceServer::new(
            services::observe::ObserveServiceImpl::new(
                logs,
                cells.clone(),
                signals,
                token.child_token(),
            )
            .with_vms(vms.clone())
            .with_containers(
                cri.as_ref()
                    .map(|c| c.containers.clone() as Arc<dyn services::observe::ContainerLogs>),
            ),
        ))
        .add_service(VmServiceServer::new(services::vms::VmServiceImpl::new(
            vms.clone(),
        )));

    let incoming = listener.incoming(tls, token.clone());
    tracing::info!("auraed {VERSION} serving on {target} (mutual TLS)");

    let serve = router.serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned());
    tokio::pin!(serve);
    // Bound, re-adopted, serving: connections queue on the socket and are
    // answered as soon as the select below polls the server.
    systemd::notify_ready(&format!("serving on {target}"));
    let served = tokio::select! {
        r = &mut serve => r.map_err(DaemonError::Serve),
        () = shutdown => {
            systemd::notify_stopping();
            tracing::info!("shutting down: no new connections, in-flight calls get {}s", config::DEFAULT_SHUTDOWN_GRACE_SECS);
            for name in SERVICE_NAMES {
                health.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
            }
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            // Stops accepting and tells every open connection GOAWAY at
            // once: the client refuses new calls on them right away (tonic
            // says CANCELLED "connection closed", then UNAVAILABLE as the
            // socket is gone), calls in flight go on. The server future must be
            // polled for that to happen, so it runs alongside the wait.
            token.cancel();
            let grace = Duration::from_secs(config::DEFAULT_SHUTDOWN_GRACE_SECS);
            let drained = inflight.drained(grace);
            tokio::pin!(drained);
            tokio::select! {
                r = &mut serve => r.map_err(DaemonError::Serve),
                ok = &mut drained => {
                    if !ok {
                        tracing::warn!("{} calls still in flight after {}s; closing them", inflight.count(), grace.as_secs());
                    }
                    // Idle connections are not waited for: give the server
                    // a moment to finish, then drop it.
                    match tokio::time::timeout(Duration::from_millis(200), &mut serve).await {
                        Ok(r) => r.map_err(DaemonError::Serve),
                        Err(_) => Ok(()),
                    }
                }
            }
        }
    };
    // Whatever happened to the server, leave nothing behind: guests get
    // their power button first, then the cells (QEMU's among them) go.
    vms.shutdown().await;
    if let Some(cri) = cri {
        // The token is cancelled: the CRI server stops and removes its socket.
        let _ = tokio::time::timeout(Duration::from_secs(2), cri.task).await;
    }
    cells.shutdown(on_exit).await;
    served?;
    tracing::info!("auraed stopped");
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_on_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will not stop the daemon cleanly");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
    }
}

/// Executables' output files live under the runtime directory. On a tmpfs
/// (`/run` on systemd hosts) their pages are charged to the writing cell's
/// memory cgroup and cannot be reclaimed without swap: a cell that prints
/// more than its memory limit is OOM-killed (its holder first, seen on
/// 2026-12-03 with 1 GiB of output in a 256 MiB cell). Said once at start.
fn warn_if_tmpfs(dir: &std::path::Path, output_cap: u64) {
    // SAFETY: a zeroed statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
    else {
        return;
    };
    // SAFETY: a valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type == libc::TMPFS_MAGIC {
        tracing::warn!(
            "executables' output is kept in {}, on a tmpfs: their output files (up to 2 x {} MiB each, --output-cap) use memory charged to their cells that cannot be reclaimed; a cell whose output outgrows its memory limit is OOM-killed. Put --library-dir on a disk filesystem, or lower --output-cap",
            dir.display(),
            output_cap >> 20
        );
    }
}
