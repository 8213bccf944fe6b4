//! The gRPC handlers of live migration: `MigrationService` (the control plane calls the source's
//! agent) and `MigrationPeerService` (the source's agent calls the destination's). The agents
//! agree on the VM, the destination starts an empty vmm and opens a port with a one-time token,
//! and each actor hands its vmm the connection (`actor_migration.rs`); the vmms move the VM over
//! mutual TLS with the agents' identities.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vmm_api::migration::{
    MigrateReceive, MigrateSend, TimeoutPolicy, DEFAULT_MAX_DOWNTIME_MS, DEFAULT_MIGRATION_TIMEOUT_MS,
    MAX_MIGRATION_TIMEOUT_MS,
};

use crate::actor::migration::{Incoming, Outgoing, ACCEPT_TIMEOUT};
use crate::client::{connect_tcp, ClientTls};
use crate::error::AgentError;
use crate::migrations::{check_storage, new_token, parse_destination};
use crate::operations::{OperationHandle, Operations};
use crate::proto::migration_peer_service_client::MigrationPeerServiceClient;
use crate::proto::migration_peer_service_server::MigrationPeerService;
use crate::proto::migration_service_server::MigrationService;
use crate::proto::{
    operation_response, CancelMigrationRequest, MigrateVmRequest, MigrationPhase, MigrationProgress,
    MigrationTimeoutPolicy, Operation, OperationKind, OperationResponse, PrepareIncomingRequest,
    PrepareIncomingResponse, Vm, VmSpec, VmState, WatchMigrationRequest,
};
use crate::requests::{fingerprint, OperationCall, OperationStarter, Requests};
use crate::snapshots::{move_nics, restore_overrides, HostCompat};
use crate::spec::{check_spec, check_vm_id};
use crate::state::{Context, PeerIdentity};
use crate::supervisor::Supervisor;

/// How long reaching the destination agent and its answer may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest switch-over pause a request may ask for.
const MAX_DOWNTIME_MS: u64 = 60_000;

/// `MigrationService` on top of the supervisor.
pub struct MigrationApi {
    ctx: Arc<Context>,
    supervisor: Arc<Supervisor>,
    ops: Arc<Operations>,
    ready: Arc<AtomicBool>,
    host: HostCompat,
    starter: OperationStarter,
}

/// What a started migration works with.
struct Prepared {
    vm: Vm,
    destination: String,
    authority: String,
    host: String,
    peer: PeerIdentity,
    progress: tokio::sync::watch::Sender<MigrationProgress>,
}

impl MigrationApi {
    /// Handlers answer UNAVAILABLE until `ready` is set (after re-adoption).
    pub fn new(
        ctx: Arc<Context>,
        supervisor: Arc<Supervisor>,
        ops: Arc<Operations>,
        ready: Arc<AtomicBool>,
        host: HostCompat,
    ) -> Self {
        let requests = Requests::new(ctx.store.clone());
        MigrationApi {
            starter: OperationStarter::new(ops.clone(), requests),
            ops,
            ctx,
            supervisor,
            ready,
            host,
        }
    }

    /// What can fail at once: the VM, its state and disks, the destination, this agent's
    /// identity, a migration already running. Marks the VM migrating.
    async fn prepare(&self, req: &MigrateVmRequest) -> Result<Prepared, AgentError> {
        let (authority, host) = parse_destination(&req.destination)?;
        let vm = self.ctx.live_vm(&req.vm_id, "migrated").await?;
        let spec = vm.spec.clone().unwrap_or_default();
        if !spec.track_dirty_pages {
            return Err(AgentError::WrongState(format!(
                "VM '{}' was created without track_dirty_pages, which live migration needs",
                vm.vm_id
            )));
        }
        crate::migrations::check_no_images(&vm.vm_id, &spec)?;
        check_storage(&vm.vm_id, &spec, req.shared_storage, &self.ctx.config.state_dir)?;
        // Refused here, before the destination is asked: every NIC needs a tap named there.
        move_nics(&mut spec.clone(), &req.nics, "the migrating VM")?;
        let peer = self.ctx.peer.clone().ok_or_else(|| {
            AgentError::WrongState(
                "this agent has no TLS listener, so no identity to show a destination agent".into(),
            )
        })?;
        let progress = self.ctx.migrations.begin(&vm.vm_id, &req.destination)?;
        Ok(Prepared {
            vm,
            destination: req.destination.clone(),
            authority,
            host,
            peer,
            progress,
        })
    }

    fn check_ready(&self) -> Result<(), AgentError> {
        crate::requests::check_ready(&self.ready)
    }
}

fn check_params(req: &MigrateVmRequest) -> Result<(), AgentError> {
    check_vm_id("vm_id", &req.vm_id)?;
    if req.max_downtime_ms > MAX_DOWNTIME_MS {
        return Err(AgentError::invalid(
            "max_downtime_ms",
            format!("at most {MAX_DOWNTIME_MS}"),
        ));
    }
    if req.timeout_ms > MAX_MIGRATION_TIMEOUT_MS {
        return Err(AgentError::invalid(
            "timeout_ms",
            format!("at most {MAX_MIGRATION_TIMEOUT_MS}"),
        ));
    }
    if MigrationTimeoutPolicy::try_from(req.on_timeout).is_err() {
        return Err(AgentError::invalid("on_timeout", "not a known policy"));
    }
    Ok(())
}

fn or_default(value: u64, default: u64) -> u64 {
    if value == 0 {
        default
    } else {
        value
    }
}

/// Asks the destination agent to get ready; its refusals keep their status code.
async fn prepare_destination(
    p: &Prepared,
    req: &MigrateVmRequest,
    protocol_version: u32,
    cpu_model: &str,
) -> Result<PrepareIncomingResponse, AgentError> {
    let tls = ClientTls {
        ca: p.peer.ca_pem.clone().into_bytes(),
        identity: Some((
            p.peer.cert_pem.clone().into_bytes(),
            p.peer.key_pem.clone().into_bytes(),
        )),
    };
    let request = PrepareIncomingRequest {
        vm_id: p.vm.vm_id.clone(),
        spec: p.vm.spec.clone(),
        cpu_model: cpu_model.to_string(),
        protocol_version,
        nics: req.nics.clone(),
        running: p.vm.state() == VmState::Running,
        timeout_ms: or_default(req.timeout_ms, DEFAULT_MIGRATION_TIMEOUT_MS),
        copy_disks: !req.shared_storage,
    };
    let call = async {
        let channel = connect_tcp(&p.authority, Some(tls)).await.map_err(|e| {
            AgentError::Unavailable(format!(
                "cannot reach the destination agent {}: {}",
                p.destination,
                crate::error::ErrorChain(&e)
            ))
        })?;
        MigrationPeerServiceClient::new(channel)
            .prepare_incoming(request)
            .await
            .map(Response::into_inner)
            .map_err(|s| AgentError::Peer(s.code(), s.message().to_string()))
    };
    tokio::time::timeout(PEER_TIMEOUT, call).await.map_err(|_| {
        AgentError::Unavailable(format!(
            "the destination agent {} did not answer within {PEER_TIMEOUT:?}",
            p.destination
        ))
    })?
}

async fn migrate_work(
    supervisor: Arc<Supervisor>,
    ctx: Arc<Context>,
    prepared: Prepared,
    req: MigrateVmRequest,
    host: HostCompat,
    mut handle: OperationHandle,
) {
    let vm_id = prepared.vm.vm_id.clone();
    prepared
        .progress
        .send_modify(|p| p.operation = handle.name().to_string());
    let result = async {
        let protocol = host
            .migration_protocol
            .unwrap_or(vmm_api::migration::PROTOCOL_VERSION);
        let ready = prepare_destination(&prepared, &req, protocol, &host.cpu_model).await?;
        let send = MigrateSend {
            connection: String::new(),
            max_downtime_ms: or_default(req.max_downtime_ms, DEFAULT_MAX_DOWNTIME_MS),
            bandwidth_bytes_per_s: req.bandwidth_bytes_per_s,
            timeout_ms: or_default(req.timeout_ms, DEFAULT_MIGRATION_TIMEOUT_MS),
            on_timeout: match req.on_timeout() {
                MigrationTimeoutPolicy::Cancel => TimeoutPolicy::Cancel,
                MigrationTimeoutPolicy::Force => TimeoutPolicy::Force,
            },
            auto_converge: !req.disable_auto_converge,
            copy_disks: !req.shared_storage,
            tls: Some(prepared.peer.migration_tls(Some(prepared.host.clone()))),
            token: ready.token,
        };
        let plan = Outgoing {
            destination: req.destination.clone(),
            data_address: ready.data_address,
            send,
        };
        let spec = prepared.vm.spec.clone().unwrap_or_default();
        let disks = if req.shared_storage { 0 } else { disk_bytes(&spec) };
        let total = (spec.memory_mib << 20) + disks;
        let watching = prepared.progress.subscribe();
        let cancel = handle.cancel_token();
        crate::snapshots::with_progress(
            &mut handle,
            total,
            || {
                let p = watching.borrow();
                p.memory_transferred_bytes + p.disk_transferred_bytes
            },
            supervisor.migrate_out(&vm_id, plan, cancel, prepared.progress.clone()),
        )
        .await
    }
    .await;
    match result {
        Ok(last) => {
            tracing::info!(vm = vm_id, destination = prepared.destination, downtime_ms = ?last.downtime_ms, "migrated");
            ctx.migrations.end(&vm_id);
            handle
                .finish(OperationResponse {
                    value: Some(operation_response::Value::Migration(last)),
                })
                .await;
        }
        Err(e) => {
            tracing::warn!(vm = vm_id, destination = prepared.destination, error = %e, "migration failed");
            prepared.progress.send_modify(|p| {
                p.phase = MigrationPhase::Failed as i32;
                if p.error.is_empty() {
                    p.error = e.to_string();
                }
            });
            ctx.migrations.end(&vm_id);
            handle.fail(e).await;
        }
    }
}

/// The size of the VM's disk images (those that cannot be read count 0: the vmm has them open).
fn disk_bytes(spec: &VmSpec) -> u64 {
    spec.disks
        .iter()
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .map(|m| m.len())
        .sum()
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl MigrationService for MigrationApi {
    async fn migrate_vm(&self, request: Request<MigrateVmRequest>) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_params(&req)?;
        let call = OperationCall {
            method: "MigrateVm",
            kind: OperationKind::MigrateVm,
            vm_id: &req.vm_id,
            request_id: &req.request_id,
            fingerprint: fingerprint(&req, |r| r.request_id.clear()),
        };
        let (supervisor, ctx, host) = (self.supervisor.clone(), self.ctx.clone(), self.host.clone());
        let work_req = req.clone();
        let op = self
            .starter
            .start(
                call,
                || self.prepare(&req),
                move |prepared, handle| migrate_work(supervisor, ctx, prepared, work_req, host, handle),
            )
            .await?;
        Ok(Response::new(op))
    }

    type WatchMigrationStream = Stream<MigrationProgress>;

    async fn watch_migration(
        &self,
        request: Request<WatchMigrationRequest>,
    ) -> Result<Response<Self::WatchMigrationStream>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_vm_id("vm_id", &req.vm_id)?;
        let mut rx = self.ctx.migrations.watch(&req.vm_id).ok_or_else(|| {
            Status::not_found(format!("VM '{}' has not migrated from here lately", req.vm_id))
        })?;
        let (tx, out) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let now = rx.borrow_and_update().clone();
                let last = matches!(now.phase(), MigrationPhase::Completed | MigrationPhase::Failed);
                if tx.send(Ok(now)).await.is_err() || last || rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn cancel_migration(
        &self,
        request: Request<CancelMigrationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_vm_id("vm_id", &req.vm_id)?;
        let name = self.ctx.migrations.operation(&req.vm_id).ok_or_else(|| {
            Status::not_found(format!("VM '{}' has not migrated from here lately", req.vm_id))
        })?;
        Ok(Response::new(self.ops.cancel(&name).await?))
    }
}

/// `MigrationPeerService`: this host receives VMs.
pub struct PeerApi {
    ctx: Arc<Context>,
    supervisor: Arc<Supervisor>,
    ready: Arc<AtomicBool>,
    host: HostCompat,
    /// One preparation at a time: the id check and the insert belong together.
    lock: tokio::sync::Mutex<()>,
}

impl PeerApi {
    /// Handlers answer UNAVAILABLE until `ready` is set.
    pub fn new(
        ctx: Arc<Context>,
        supervisor: Arc<Supervisor>,
        ready: Arc<AtomicBool>,
        host: HostCompat,
    ) -> Self {
        PeerApi {
            ctx,
            supervisor,
            ready,
            host,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    fn check_host(&self, req: &PrepareIncomingRequest) -> Result<(), AgentError> {
        if let Some(ours) = self.host.migration_protocol {
            if req.protocol_version != ours {
                return Err(AgentError::WrongState(format!(
                    "the source's vmm speaks migration protocol {}, this host's vmm speaks {ours}",
                    req.protocol_version
                )));
            }
        }
        if req.cpu_model != self.host.cpu_model {
            return Err(AgentError::WrongState(format!(
                "the VM runs on a {:?} CPU; this host has {:?}",
                req.cpu_model, self.host.cpu_model
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl MigrationPeerService for PeerApi {
    async fn prepare_incoming(
        &self,
        request: Request<PrepareIncomingRequest>,
    ) -> Result<Response<PrepareIncomingResponse>, Status> {
        let req = request.into_inner();
        crate::requests::check_ready(&self.ready)?;
        check_vm_id("vm_id", &req.vm_id)?;
        self.check_host(&req)?;
        let peer = self.ctx.peer.clone().ok_or_else(|| {
            AgentError::WrongState("this agent has no TLS listener to receive migrations on".into())
        })?;
        // The NICs move first: the source's bridges need not exist here.
        let mut spec = req
            .spec
            .clone()
            .ok_or_else(|| AgentError::invalid("spec", "is required"))?;
        move_nics(&mut spec, &req.nics, "the migrating VM")?;
        crate::migrations::check_no_images(&req.vm_id, &spec)?;
        let mut spec = check_spec(Some(&spec))?.clone();
        // Copied disks arrive in new files of the VM's own; shared ones stay where they are.
        let vm_dir = self.ctx.config.vm_dir(&req.vm_id);
        let disk_copies: Vec<PathBuf> = if req.copy_disks {
            (0..spec.disks.len())
                .map(|i| crate::snapshots::restored_disk_path(&vm_dir, i))
                .collect()
        } else {
            Vec::new()
        };
        for (disk, path) in spec.disks.iter_mut().zip(&disk_copies) {
            disk.path = path.display().to_string();
        }
        crate::nics::check_nics(&spec.nics)?;
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(peer.listen_ip, 0))
            .await
            .map_err(|e| AgentError::Internal(format!("cannot open a migration port: {e}")))?;
        let data_address = listener
            .local_addr()
            .map_err(|e| AgentError::Internal(format!("migration port: {e}")))?
            .to_string();
        let token = new_token()?;
        let desired = if req.running {
            VmState::Running
        } else {
            VmState::Paused
        };
        let vm = Vm {
            vm_id: req.vm_id.clone(),
            spec: Some(spec.clone()),
            state: VmState::Starting as i32,
            desired_state: desired as i32,
            state_reason: crate::actor::migration::ARRIVING_REASON.into(),
            ..Default::default()
        };
        let guard = self.lock.lock().await;
        let limit = self.ctx.config.allocatable;
        // Admission like CreateVm: RESOURCE_EXHAUSTED before any memory is sent.
        let vm = self
            .ctx
            .store
            .call(move |s| s.create_vm(vm, Some(limit), None))
            .await?;
        self.supervisor.add(vm);
        drop(guard);
        // Shared writable drives are named here too: what the source recorded may be a descriptor
        // of its own (a VM restored in a jail gets its writable disks as descriptors; read-only
        // ones it opens by their host paths).
        let overrides = vmm_api::snapshot::RestoreOverrides {
            drives: spec
                .disks
                .iter()
                .enumerate()
                .filter(|(_, disk)| req.copy_disks || !disk.read_only)
                .map(|(i, disk)| vmm_api::snapshot::DriveOverride {
                    // The ids `spec::to_vm_config` gives drives.
                    id: format!("disk{i}"),
                    path: Some(PathBuf::from(&disk.path)),
                    fd: None,
                })
                .collect(),
            ..restore_overrides(&spec, &self.ctx.config.console_log(&req.vm_id))
        };
        let receive = MigrateReceive {
            connection: String::new(),
            overrides,
            tls: Some(peer.migration_tls(None)),
            token: token.clone(),
        };
        let plan = Incoming {
            listener,
            receive,
            disk_copies,
            wait: Duration::from_millis(req.timeout_ms.min(MAX_MIGRATION_TIMEOUT_MS)) + ACCEPT_TIMEOUT,
        };
        let supervisor = self.supervisor.clone();
        let vm_id = req.vm_id.clone();
        tokio::spawn(async move {
            match supervisor.migrate_in(&vm_id, plan).await {
                Ok(vm) => tracing::info!(vm = vm_id, state = ?vm.state(), "VM arrived by live migration"),
                Err(e) => tracing::warn!(vm = vm_id, error = %e, "incoming migration failed; VM removed"),
            }
        });
        Ok(Response::new(PrepareIncomingResponse { data_address, token }))
    }
}
