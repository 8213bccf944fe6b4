//! The gRPC handlers of `SnapshotService`: snapshots are records in the store with their files
//! under `<state dir>/snapshots/<id>/`; the VM's actor drives the vmm (`actor_snapshot.rs`), and
//! creating and restoring are operations whose progress is the bytes written so far.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use vmm_api::snapshot::{SnapshotInfo, SnapshotKind as VmmKind, SnapshotRestore};

use crate::error::AgentError;
use crate::operations::{OperationHandle, Operations};
use crate::proto::snapshot_service_server::SnapshotService;
use crate::proto::{
    operation_response, CreateSnapshotRequest, DeleteSnapshotRequest, DeleteSnapshotResponse,
    GetSnapshotRequest, ListSnapshotsRequest, ListSnapshotsResponse, Operation, OperationKind,
    OperationResponse, RestoreSnapshotRequest, Snapshot, SnapshotState, Vm, VmState,
};
use crate::requests::{fingerprint, OperationCall, OperationStarter, Requests};
use crate::snapshots::{
    allocated_bytes, check_compatible, check_snapshot_id, proto_kind, restore_overrides, restored_spec,
    vmm_kind, with_progress, HostCompat,
};
use crate::spec::{check_labels, check_vm_id, Selector};
use crate::state::Context;
use crate::store::now_ms;
use crate::supervisor::Supervisor;

/// Default and largest page of `ListSnapshots`.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// Page tokens carry the last id of the previous page behind this prefix.
const PAGE_TOKEN_PREFIX: &str = "after:";
/// What snapshots left CREATING by a previous agent become.
pub const INTERRUPTED_REASON: &str = "the agent stopped while this snapshot was being written";

/// `SnapshotService` on top of the supervisor and the store.
pub struct SnapshotApi {
    ctx: Arc<Context>,
    supervisor: Arc<Supervisor>,
    ready: Arc<AtomicBool>,
    host: HostCompat,
    requests: Requests,
    starter: OperationStarter,
    /// Serializes the request-id check and the work of deletes.
    delete_lock: tokio::sync::Mutex<()>,
}

impl SnapshotApi {
    /// Handlers answer UNAVAILABLE until `ready` is set (after re-adoption).
    pub fn new(
        ctx: Arc<Context>,
        supervisor: Arc<Supervisor>,
        ops: Arc<Operations>,
        ready: Arc<AtomicBool>,
        host: HostCompat,
    ) -> Self {
        let requests = Requests::new(ctx.store.clone());
        SnapshotApi {
            starter: OperationStarter::new(ops, requests.clone()),
            requests,
            ctx,
            supervisor,
            ready,
            host,
            delete_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn check_ready(&self) -> Result<(), AgentError> {
        crate::requests::check_ready(&self.ready)
    }

    async fn snapshot(&self, id: &str) -> Result<Snapshot, AgentError> {
        let key = id.to_string();
        self.ctx
            .store
            .call(move |s| s.get_snapshot(&key))
            .await?
            .ok_or_else(|| AgentError::SnapshotNotFound(id.to_string()))
    }

    /// What can fail at once about a create: the VM and its state, the kind, the id. Stores the
    /// snapshot as CREATING and returns it.
    async fn prepare_create(
        &self,
        req: &CreateSnapshotRequest,
        kind: VmmKind,
    ) -> Result<Snapshot, AgentError> {
        let vm = self.ctx.live_vm(&req.vm_id, "snapshotted").await?;
        let spec = vm.spec.clone().unwrap_or_default();
        if kind == VmmKind::Diff && !spec.track_dirty_pages {
            return Err(AgentError::WrongState(format!(
                "VM '{}' was created without track_dirty_pages, which diff snapshots need",
                vm.vm_id
            )));
        }
        let snapshot = Snapshot {
            snapshot_id: req.snapshot_id.clone(),
            vm_id: vm.vm_id.clone(),
            kind: proto_kind(kind) as i32,
            state: SnapshotState::Creating as i32,
            spec: Some(spec),
            create_time_ms: now_ms(),
            labels: req.labels.clone(),
            ..Default::default()
        };
        let stored = snapshot.clone();
        self.ctx.store.call(move |s| s.insert_snapshot(&stored)).await?;
        Ok(snapshot)
    }

    /// What can fail at once about a restore: the snapshot, this host, the new VM's id, spec and
    /// resources. Stores the new VM (STARTING, its resources reserved), adds its actor, and
    /// returns what the vmm is to be asked.
    async fn prepare_restore(
        &self,
        req: &RestoreSnapshotRequest,
    ) -> Result<(Snapshot, SnapshotRestore, Vec<PathBuf>), AgentError> {
        let snapshot = self.snapshot(&req.snapshot_id).await?;
        if snapshot.state() != SnapshotState::Ready {
            return Err(AgentError::WrongState(format!(
                "snapshot '{}' is not ready (it is {})",
                snapshot.snapshot_id,
                snapshot.state().as_str_name()
            )));
        }
        check_compatible(&snapshot, &self.host)?;
        let chain = self.check_chain(&snapshot).await?;
        let vm_dir = self.ctx.config.vm_dir(&req.vm_id);
        let spec = restored_spec(&snapshot, &vm_dir, &req.nics, req.labels.clone())?;
        crate::nics::check_nics(&spec.nics).map_err(|e| match e {
            AgentError::InvalidArgument { field, reason } => {
                AgentError::invalid("nics", format!("the restored {field}: {reason}"))
            }
            other => other,
        })?;
        let desired = if req.start_paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        let vm = Vm {
            vm_id: req.vm_id.clone(),
            spec: Some(spec.clone()),
            state: VmState::Starting as i32,
            desired_state: desired as i32,
            restored_from: snapshot.snapshot_id.clone(),
            ..Default::default()
        };
        let limit = self.ctx.config.allocatable;
        let vm = self
            .ctx
            .store
            .call(move |s| s.create_vm(vm, Some(limit), None))
            .await?;
        self.supervisor.add(vm);
        let request = SnapshotRestore {
            dir: self.ctx.config.snapshot_dir(&snapshot.snapshot_id),
            overrides: restore_overrides(&spec, &self.ctx.config.console_log(&req.vm_id)),
            resume: !req.start_paused,
            prefault: req.prefault,
        };
        Ok((snapshot, request, chain))
    }

    /// Every snapshot of a diff chain must be there, READY, with its files. Returns their
    /// directories, newest first.
    async fn check_chain(&self, newest: &Snapshot) -> Result<Vec<PathBuf>, AgentError> {
        let mut current = newest.clone();
        let mut chain = Vec::new();
        for _ in 0..=vmm_api::snapshot::MAX_CHAIN {
            let dir = self.ctx.config.snapshot_dir(&current.snapshot_id);
            if !dir.join("state").is_file() {
                return Err(AgentError::WrongState(format!(
                    "the files of snapshot '{}' are missing",
                    current.snapshot_id
                )));
            }
            chain.push(dir);
            if current.base_snapshot_id.is_empty() {
                return Ok(chain);
            }
            let base = self.snapshot(&current.base_snapshot_id).await.map_err(|_| {
                AgentError::WrongState(format!(
                    "snapshot '{}' builds on '{}', which is gone",
                    current.snapshot_id, current.base_snapshot_id
                ))
            })?;
            if base.state() != SnapshotState::Ready {
                return Err(AgentError::WrongState(format!(
                    "snapshot '{}' builds on '{}', which is not ready",
                    current.snapshot_id, base.snapshot_id
                )));
            }
            current = base;
        }
        Err(AgentError::WrongState(format!(
            "the chain of snapshot '{}' is longer than {}",
            newest.snapshot_id,
            vmm_api::snapshot::MAX_CHAIN
        )))
    }
}

/// The snapshot record once the vmm wrote `info`, or why it cannot be kept.
async fn finish_create(
    ctx: &Context,
    mut snapshot: Snapshot,
    info: SnapshotInfo,
) -> Result<Snapshot, AgentError> {
    if let Some(parent) = &info.parent {
        // The vmm names the snapshot a diff builds on by its directory.
        let base = parent
            .strip_prefix(ctx.config.snapshots_dir())
            .ok()
            .and_then(|p| p.to_str())
            .map(str::to_string)
            .unwrap_or_default();
        let key = base.clone();
        let found = ctx.store.call(move |s| s.get_snapshot(&key)).await?;
        if found.is_none_or(|b| b.state() != SnapshotState::Ready) {
            return Err(AgentError::WrongState(format!(
                "the VM's previous snapshot ({}) is no longer kept, so a diff has no base; take a full snapshot",
                parent.display()
            )));
        }
        snapshot.base_snapshot_id = base;
    }
    let dir = ctx.config.snapshot_dir(&snapshot.snapshot_id);
    snapshot.state = SnapshotState::Ready as i32;
    snapshot.size_bytes = allocated_bytes(&dir);
    snapshot.memory_bytes = info.memory_bytes;
    snapshot.disk_bytes = info.disk_bytes;
    snapshot.duration_ms = info.duration_us / 1000;
    snapshot.vmm_version = info.vmm_version;
    snapshot.format_version = info.format_version;
    snapshot.cpu_model = info.cpu_model;
    let stored = snapshot.clone();
    ctx.store.call(move |s| s.update_snapshot(&stored)).await?;
    Ok(snapshot)
}

/// The create operation's work: the vmm writes the snapshot while its directory's size is the
/// progress; a failure leaves neither record nor files.
async fn create_work(
    ctx: Arc<Context>,
    supervisor: Arc<Supervisor>,
    snapshot: Snapshot,
    kind: VmmKind,
    leave_paused: bool,
    mut handle: OperationHandle,
) {
    let dir = ctx.config.snapshot_dir(&snapshot.snapshot_id);
    let spec = snapshot.spec.clone().unwrap_or_default();
    let disks: u64 = spec
        .disks
        .iter()
        .filter(|d| !d.read_only)
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .sum();
    let total = (spec.memory_mib << 20) + disks;
    let cancel = handle.cancel_token();
    let written = with_progress(
        &mut handle,
        total,
        || allocated_bytes(&dir),
        supervisor.snapshot(&snapshot.vm_id, dir.clone(), kind, leave_paused, cancel),
    )
    .await;
    let id = snapshot.snapshot_id.clone();
    let result = match written {
        Ok(info) => finish_create(&ctx, snapshot, info).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(snapshot) => {
            let size = snapshot.size_bytes;
            handle.progress(size, size).await;
            handle
                .finish(OperationResponse {
                    value: Some(operation_response::Value::Snapshot(snapshot)),
                })
                .await;
        }
        Err(e) => {
            if dir.exists() {
                if let Err(rm) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(snapshot = id, error = %rm, "cannot remove a failed snapshot");
                }
            }
            let key = id.clone();
            if let Err(db) = ctx.store.call(move |s| s.remove_snapshot_record(&key)).await {
                tracing::error!(snapshot = id, error = %db, "cannot forget a failed snapshot");
            }
            handle.fail(e).await;
        }
    }
}

/// The restore operation's work: the vmm copies the writable disks (the progress) and maps the
/// memory; a failure removes the new VM.
async fn restore_work(
    supervisor: Arc<Supervisor>,
    vm_id: String,
    snapshot: Snapshot,
    request: SnapshotRestore,
    chain: Vec<PathBuf>,
    mut handle: OperationHandle,
) {
    let disk_paths: Vec<_> = request
        .overrides
        .drives
        .iter()
        .filter_map(|d| d.path.clone())
        .collect();
    let copied = || {
        disk_paths
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum::<u64>()
    };
    let total = snapshot.disk_bytes;
    let cancel = handle.cancel_token();
    let restored = with_progress(
        &mut handle,
        total,
        copied,
        supervisor.restore(&vm_id, request, chain, cancel),
    )
    .await;
    match restored {
        Ok(vm) => {
            handle.progress(total, total).await;
            handle.finish_vm(vm).await;
        }
        Err(e) => {
            tracing::warn!(vm = vm_id, snapshot = snapshot.snapshot_id, error = %e, "restore failed");
            handle.fail(e).await;
        }
    }
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_vm_id("vm_id", &req.vm_id)?;
        check_snapshot_id("snapshot_id", &req.snapshot_id)?;
        check_labels("labels", &req.labels)?;
        let kind = vmm_kind("kind", req.kind)?;
        let call = OperationCall {
            method: "CreateSnapshot",
            kind: OperationKind::CreateSnapshot,
            vm_id: &req.vm_id,
            request_id: &req.request_id,
            fingerprint: fingerprint(&req, |r| r.request_id.clear()),
        };
        let (ctx, supervisor) = (self.ctx.clone(), self.supervisor.clone());
        let leave_paused = req.leave_paused;
        let op = self
            .starter
            .start(
                call,
                || self.prepare_create(&req, kind),
                move |snapshot, handle| create_work(ctx, supervisor, snapshot, kind, leave_paused, handle),
            )
            .await?;
        Ok(Response::new(op))
    }

    async fn restore_snapshot(
        &self,
        request: Request<RestoreSnapshotRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_snapshot_id("snapshot_id", &req.snapshot_id)?;
        check_vm_id("vm_id", &req.vm_id)?;
        check_labels("labels", &req.labels)?;
        let call = OperationCall {
            method: "RestoreSnapshot",
            kind: OperationKind::RestoreSnapshot,
            vm_id: &req.vm_id,
            request_id: &req.request_id,
            fingerprint: fingerprint(&req, |r| r.request_id.clear()),
        };
        let supervisor = self.supervisor.clone();
        let vm_id = req.vm_id.clone();
        let op = self
            .starter
            .start(
                call,
                || self.prepare_restore(&req),
                move |(snapshot, request, chain), handle| {
                    restore_work(supervisor, vm_id, snapshot, request, chain, handle)
                },
            )
            .await?;
        Ok(Response::new(op))
    }

    async fn get_snapshot(&self, request: Request<GetSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_snapshot_id("snapshot_id", &req.snapshot_id)?;
        Ok(Response::new(self.snapshot(&req.snapshot_id).await?))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        if !req.vm_id.is_empty() {
            check_vm_id("vm_id", &req.vm_id)?;
        }
        let selector = Selector::parse(&req.label_selector)?;
        let mut after = match req.page_token.as_str() {
            "" => None,
            t => match t.strip_prefix(PAGE_TOKEN_PREFIX) {
                Some(id) if check_snapshot_id("page_token", id).is_ok() => Some(id.to_string()),
                _ => return Err(AgentError::invalid("page_token", "not a token from ListSnapshots").into()),
            },
        };
        let page_size = match req.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let vm_id = (!req.vm_id.is_empty()).then(|| req.vm_id.clone());
        // Read in batches until a page (and one more, to know whether another page follows) is
        // found: the label selector is applied here, not in SQL.
        let mut snapshots = Vec::new();
        let mut more = false;
        loop {
            let (vm, from) = (vm_id.clone(), after.clone());
            let batch = self
                .ctx
                .store
                .call(move |s| s.list_snapshots(vm.as_deref(), from.as_deref(), MAX_PAGE_SIZE))
                .await?;
            let exhausted = batch.len() < MAX_PAGE_SIZE;
            after = batch.last().map(|s| s.snapshot_id.clone());
            for s in batch.into_iter().filter(|s| selector.matches(&s.labels)) {
                if snapshots.len() == page_size {
                    more = true;
                    break;
                }
                snapshots.push(s);
            }
            if more || exhausted {
                break;
            }
        }
        let next_page_token = match (more, snapshots.last()) {
            (true, Some(last)) => format!("{PAGE_TOKEN_PREFIX}{}", last.snapshot_id),
            _ => String::new(),
        };
        Ok(Response::new(ListSnapshotsResponse {
            snapshots,
            next_page_token,
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_snapshot_id("snapshot_id", &req.snapshot_id)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let _guard = self.delete_lock.lock().await;
        if let Some(done) = self
            .requests
            .replay::<DeleteSnapshotResponse>(&req.request_id, "DeleteSnapshot", &fp)
            .await?
        {
            return Ok(Response::new(done));
        }
        let id = req.snapshot_id.clone();
        self.ctx.store.call(move |s| s.delete_snapshot(&id)).await?;
        let dir = self.ctx.config.snapshot_dir(&req.snapshot_id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(snapshot = req.snapshot_id, error = %e, "cannot remove a snapshot's files");
            }
        }
        let done = self
            .requests
            .remember(&req.request_id, "DeleteSnapshot", fp, DeleteSnapshotResponse {})
            .await?;
        Ok(Response::new(done))
    }
}
