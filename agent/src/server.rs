//! The agent put together: state dir and store, gRPC services (VmService, HostService, health,
//! reflection) on a Unix socket, and re-adoption of the VMs that run.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic_health::ServingStatus;
use vmm_api::socket::MAX_SOCKET_PATH;

use crate::host::{HostApi, HostFacts};
use crate::proto::host_service_server::HostServiceServer;
use crate::proto::vm_service_server::VmServiceServer;
use crate::service::VmApi;
use crate::state::{AgentConfig, Context, StoreHandle};
use crate::store::{Store, StoreError};
use crate::supervisor::Supervisor;

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

/// Runs the agent on the Unix socket `listen` until `shutdown` resolves. Health reports NOT_SERVING
/// (and VmService answers UNAVAILABLE) until every stored VM is re-adopted or settled.
pub async fn run(
    config: AgentConfig,
    listen: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let state_dir = config.state_dir.clone();
    let vms_dir = state_dir.join("vms");
    std::fs::create_dir_all(&vms_dir).map_err(|e| ServerError::StateDir(state_dir.clone(), e))?;
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
    let ctx = Arc::new(Context {
        config,
        store: StoreHandle::new(store),
    });
    let supervisor = Supervisor::new(ctx.clone());
    let ready = Arc::new(AtomicBool::new(false));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_not_serving::<VmServiceServer<VmApi>>().await;
    health.set_not_serving::<HostServiceServer<HostApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let listener = bind_unix(listen).await?;
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(VmServiceServer::new(VmApi::new(
            ctx.clone(),
            supervisor.clone(),
            ready.clone(),
        )))
        .add_service(HostServiceServer::new(HostApi::new(ctx.clone(), facts)));
    let serving =
        tokio::spawn(router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown));

    tracing::info!(socket = %listen.display(), "serving; re-adopting VMs");
    supervisor
        .adopt_all()
        .await
        .map_err(|e| ServerError::Adopt(e.to_string()))?;
    ready.store(true, Ordering::Release);
    health.set_service_status("", ServingStatus::Serving).await;
    health.set_serving::<VmServiceServer<VmApi>>().await;
    health.set_serving::<HostServiceServer<HostApi>>().await;
    tracing::info!("ready");

    let result = serving.await.map_err(|e| ServerError::Adopt(e.to_string()))?;
    let _ = std::fs::remove_file(listen);
    Ok(result?)
}
