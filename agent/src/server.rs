//! The agent put together: state dir and store, gRPC services (VmService, SnapshotService,
//! ImageService, OperationsService, HostService, health, reflection) on Unix sockets and TCP (mutual TLS, with roles checked per
//! call; every call counted for the metrics), the Prometheus endpoint, and re-adoption of the VMs
//! that run.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic_health::ServingStatus;
use vmm_api::socket::MAX_SOCKET_PATH;

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::boot_slots::BootSlots;
use crate::cgroups::VmCgroups;
use crate::host::{HostApi, HostFacts};
use crate::image_service::ImageApi;
use crate::listen::{Listen, TlsFiles};
use crate::metrics::Metrics;
use crate::migration_service::{MigrationApi, PeerApi};
use crate::migrations::Migrations;
use crate::operations::Operations;
use crate::ops_service::OperationsApi;
use crate::proto::host_service_server::HostServiceServer;
use crate::proto::image_service_server::ImageServiceServer;
use crate::proto::migration_peer_service_server::MigrationPeerServiceServer;
use crate::proto::migration_service_server::MigrationServiceServer;
use crate::proto::operations_service_server::OperationsServiceServer;
use crate::proto::snapshot_service_server::SnapshotServiceServer;
use crate::proto::vm_service_server::VmServiceServer;
use crate::roles::RoleLayer;
use crate::rpc_metrics::RpcMetricsLayer;
use crate::service::VmApi;
use crate::snapshot_service::{SnapshotApi, INTERRUPTED_REASON};
use crate::snapshots::HostCompat;
use crate::state::{AgentConfig, Context, PeerIdentity, StoreHandle};
use crate::store::{Store, StoreError};
use crate::supervisor::Supervisor;

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Why the agent could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The state directory cannot be used.
    #[error("state directory {0}")]
    StateDir(PathBuf, #[source] std::io::Error),
    /// The database cannot be opened.
    #[error("state database")]
    Store(#[from] StoreError),
    /// The listening socket cannot be set up.
    #[error("listen socket {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    /// Another agent serves this socket.
    #[error("{0} is served by another process")]
    InUse(PathBuf),
    /// Socket paths under the state directory would be too long.
    #[error("state directory path too long for control socket paths (at most {0} bytes)")]
    StateDirTooLong(usize),
    /// Reflection could not be set up.
    #[error("reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// gRPC serving failed.
    #[error("gRPC server")]
    Serve(#[from] tonic::transport::Error),
    /// The operations a previous agent left running could not be settled.
    #[error("recovering operations")]
    Operations(#[source] crate::error::AgentError),
    /// The images a previous agent left half made could not be found out.
    #[error("reading the images")]
    Images(#[source] crate::error::AgentError),
    /// A TCP address cannot be bound.
    #[error("listen on {0}")]
    Tcp(std::net::SocketAddr, #[source] std::io::Error),
    /// A TLS file cannot be read.
    #[error("TLS file {0}")]
    TlsFile(PathBuf, #[source] std::io::Error),
    /// The TLS identity or client CA is unusable.
    #[error("TLS configuration")]
    TlsConfig(#[source] tonic::transport::Error),
    /// A serving task ended abnormally.
    #[error("serving task: {0}")]
    Task(String),
    /// The VMs' cgroups cannot be set up as asked (`--vms-cpu-max`).
    #[error("VM cgroups")]
    Cgroups(#[source] crate::cgroups::CgroupError),
    /// Re-adoption failed.
    #[error("re-adopting VMs: {0}")]
    Adopt(String),
}

/// Binds `path`, replacing a stale socket file that nothing serves.
async fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| ServerError::Listen(path.to_path_buf(), e))?;
    }
    let listen_err = |e| ServerError::Listen(path.to_path_buf(), e);
    // Owner and group only: whoever can connect can run VMs. The path appears once it accepts.
    let listener = vmm_api::socket::bind_published(path, Some(0o660)).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    UnixListener::from_std(listener).map_err(listen_err)
}

/// The VMs' cgroups as configured. Without a cap asked for, a host that has no usable CPU
/// hierarchy runs its vmms in the agent's group (with a warning); with one, that stops the agent.
fn vm_cgroups(config: &AgentConfig) -> Result<Option<VmCgroups>, ServerError> {
    let Some(name) = &config.vm_cgroup else {
        return Ok(None);
    };
    match VmCgroups::setup(Path::new(CGROUP_ROOT), name, config.vms_cpu_max) {
        Ok(c) => {
            tracing::info!(parent = %c.parent().display(), cpu_max = ?config.vms_cpu_max, "VM cgroups");
            Ok(Some(c))
        }
        Err(e) if config.vms_cpu_max.is_none() => {
            tracing::warn!(error = %crate::error::ErrorChain(&e), "no per-VM cgroups: vmms stay in the agent's cgroup");
            Ok(None)
        }
        Err(e) => Err(ServerError::Cgroups(e)),
    }
}

/// Runs the agent on `listens` until `shutdown` resolves. Health reports NOT_SERVING
/// (and VmService answers UNAVAILABLE) until every stored VM is re-adopted or settled.
pub async fn run(
    config: AgentConfig,
    listens: Vec<Listen>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let state_dir = config.state_dir.clone();
    let vms_dir = state_dir.join("vms");
    std::fs::create_dir_all(&vms_dir).map_err(|e| ServerError::StateDir(state_dir.clone(), e))?;
    std::fs::create_dir_all(config.snapshots_dir())
        .map_err(|e| ServerError::StateDir(state_dir.clone(), e))?;
    std::fs::create_dir_all(config.images_dir()).map_err(|e| ServerError::StateDir(state_dir.clone(), e))?;
    // The longest id must still give a usable control socket path.
    let longest = config.api_sock(&"x".repeat(crate::spec::MAX_VM_ID_LEN));
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ServerError::StateDirTooLong(
            MAX_SOCKET_PATH - (longest.as_os_str().len() - state_dir.as_os_str().len()),
        ));
    }
    let db = state_dir.join("state.db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| ServerError::Adopt(e.to_string()))??;
    let facts = HostFacts::gather(&config.vmm_bin);
    let metrics = Arc::new(Metrics::new());
    let rpc_metrics = RpcMetricsLayer::new(metrics.clone());
    let cgroups = vm_cgroups(&config)?;
    let boot_slots = BootSlots::new(config.max_concurrent_boots, config.boot_slot_timeout);
    let ctx = Arc::new(Context {
        cgroups,
        boot_slots,
        config,
        store: StoreHandle::new(store),
        migrations: Migrations::default(),
        peer: peer_identity(&listens)?,
        metrics,
    });
    let supervisor = Supervisor::new(ctx.clone());
    // Before serving: no worker of a previous agent is left to finish what it started.
    let ops = Operations::new(ctx.store.clone());
    let aborted = ops.recover().await.map_err(ServerError::Operations)?;
    if aborted > 0 {
        tracing::warn!(
            aborted,
            "operations left running by the previous agent are ABORTED"
        );
    }
    let interrupted = ctx
        .store
        .call(|s| s.fail_unfinished_snapshots(INTERRUPTED_REASON))
        .await
        .map_err(ServerError::Operations)?;
    if !interrupted.is_empty() {
        tracing::warn!(
            ?interrupted,
            "snapshots left half-written by the previous agent are FAILED"
        );
    }
    // Before serving: what a registration or deletion cut short left behind.
    let images = ctx
        .store
        .call(|s| s.image_ids())
        .await
        .map_err(ServerError::Images)?;
    let images_dir = ctx.config.images_dir();
    let _ = tokio::task::spawn_blocking(move || crate::images::remove_leftovers(&images_dir, &images)).await;
    let ready = Arc::new(AtomicBool::new(false));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_not_serving::<VmServiceServer<VmApi>>().await;
    health.set_not_serving::<HostServiceServer<HostApi>>().await;
    health
        .set_not_serving::<SnapshotServiceServer<SnapshotApi>>()
        .await;
    health
        .set_not_serving::<MigrationServiceServer<MigrationApi>>()
        .await;
    health.set_not_serving::<ImageServiceServer<ImageApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let vm_service = VmServiceServer::new(VmApi::new(
        ctx.clone(),
        supervisor.clone(),
        ops.clone(),
        ready.clone(),
    ));
    let compat = HostCompat {
        cpu_model: vmm_api::snapshot::host_cpu_model(),
        format_version: vmm_api::snapshot::format_of_version_line(&facts.vmm_version),
        migration_protocol: vmm_api::snapshot::migration_protocol_of_version_line(&facts.vmm_version),
    };
    let snapshot_service = SnapshotServiceServer::new(SnapshotApi::new(
        ctx.clone(),
        supervisor.clone(),
        ops.clone(),
        ready.clone(),
        compat.clone(),
    ));
    let migration_service = MigrationServiceServer::new(MigrationApi::new(
        ctx.clone(),
        supervisor.clone(),
        ops.clone(),
        ready.clone(),
        compat.clone(),
    ));
    let peer_service = MigrationPeerServiceServer::new(PeerApi::new(
        ctx.clone(),
        supervisor.clone(),
        ready.clone(),
        compat,
    ));
    let image_service = ImageServiceServer::new(ImageApi::new(ctx.clone(), ready.clone()));
    let ops_service = OperationsServiceServer::new(OperationsApi::new(ops));
    let host_service = HostServiceServer::new(HostApi::new(ctx.clone(), facts));
    // The same services on every listener; only the TLS ones check roles.
    macro_rules! router {
        ($builder:expr) => {
            $builder
                .add_service(health_service.clone())
                .add_service(reflection.clone())
                .add_service(vm_service.clone())
                .add_service(snapshot_service.clone())
                .add_service(migration_service.clone())
                .add_service(peer_service.clone())
                .add_service(image_service.clone())
                .add_service(ops_service.clone())
                .add_service(host_service.clone())
        };
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            // An error means the sender is gone, which only happens after it sent.
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    if let Some(addr) = ctx.config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServerError::Tcp(addr, e))?;
        let local = listener.local_addr().unwrap_or(addr);
        // Not in `serving`: it cannot fail once bound (accept errors are retried), and it ends
        // with the others on shutdown.
        tokio::spawn(crate::metrics_http::serve(listener, ctx.clone(), stopped()));
        tracing::info!(addr = %local, "serving Prometheus metrics on /metrics");
    }
    let mut serving = tokio::task::JoinSet::new();
    // TCP first: by the time the Unix socket appears (what scripts wait for), every port is bound.
    let mut ordered: Vec<&Listen> = listens.iter().collect();
    ordered.sort_by_key(|l| matches!(l, Listen::Unix(_)));
    for listen in ordered {
        match listen {
            Listen::Unix(path) => {
                let incoming = UnixListenerStream::new(bind_unix(path).await?);
                let mut builder = tonic::transport::Server::builder().layer(rpc_metrics.clone());
                let router = router!(builder);
                serving.spawn(router.serve_with_incoming_shutdown(incoming, stopped()));
                tracing::info!(socket = %path.display(), "serving gRPC");
            }
            Listen::Tls { addr, tls } => {
                let incoming = TcpIncoming::bind(*addr).map_err(|e| ServerError::Tcp(*addr, e))?;
                let local = incoming.local_addr().unwrap_or(*addr);
                let mut builder = tonic::transport::Server::builder()
                    .tls_config(server_tls(tls)?)
                    .map_err(ServerError::TlsConfig)?
                    // Outermost, so that calls the role check refuses are counted too.
                    .layer(rpc_metrics.clone())
                    .layer(RoleLayer);
                let router = router!(builder);
                serving.spawn(router.serve_with_incoming_shutdown(incoming, stopped()));
                tracing::info!(addr = %local, "serving gRPC with mutual TLS");
            }
            Listen::InsecureTcp(addr) => {
                let incoming = TcpIncoming::bind(*addr).map_err(|e| ServerError::Tcp(*addr, e))?;
                let local = incoming.local_addr().unwrap_or(*addr);
                let mut builder = tonic::transport::Server::builder().layer(rpc_metrics.clone());
                let router = router!(builder);
                serving.spawn(router.serve_with_incoming_shutdown(incoming, stopped()));
                tracing::warn!(addr = %local, "serving gRPC on plain TCP: every local client is admin");
            }
        }
    }

    tracing::info!("re-adopting VMs");
    supervisor
        .adopt_all()
        .await
        .map_err(|e| ServerError::Adopt(e.to_string()))?;
    ready.store(true, Ordering::Release);
    health.set_service_status("", ServingStatus::Serving).await;
    health.set_serving::<VmServiceServer<VmApi>>().await;
    health.set_serving::<HostServiceServer<HostApi>>().await;
    health.set_serving::<SnapshotServiceServer<SnapshotApi>>().await;
    health.set_serving::<MigrationServiceServer<MigrationApi>>().await;
    health.set_serving::<ImageServiceServer<ImageApi>>().await;
    tracing::info!("ready");

    // The first listener to fail ends the agent (dropping the set stops the others).
    let mut result = Ok(());
    while let Some(ended) = serving.join_next().await {
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                result = Err(ServerError::Serve(e));
                break;
            }
            Err(e) => {
                result = Err(ServerError::Task(e.to_string()));
                break;
            }
        }
    }
    for listen in &listens {
        if let Listen::Unix(path) = listen {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

/// What this agent shows peer agents: the identity and client CA of its first TLS listener, whose
/// address also takes incoming migration connections.
fn peer_identity(listens: &[Listen]) -> Result<Option<PeerIdentity>, ServerError> {
    let Some((addr, files)) = listens.iter().find_map(|l| match l {
        Listen::Tls { addr, tls } => Some((addr, tls)),
        _ => None,
    }) else {
        return Ok(None);
    };
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| ServerError::TlsFile(p.to_path_buf(), e));
    Ok(Some(PeerIdentity {
        cert_pem: read(&files.cert)?,
        key_pem: read(&files.key)?,
        ca_pem: read(&files.client_ca)?,
        listen_ip: addr.ip(),
    }))
}

/// The server side of mutual TLS: our identity, and the CA that client certificates must chain
/// to (tonic refuses clients without one).
fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig, ServerError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| ServerError::TlsFile(p.to_path_buf(), e));
    let identity = Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    Ok(ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(read(&files.client_ca)?)))
}
