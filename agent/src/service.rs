//! The gRPC handlers of `VmService`: they check input, handle `request_id` replays and hand the work
//! to the supervisor or the store. Errors become statuses only in `error.rs`.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vmm_api::control::MAX_SHUTDOWN_TIMEOUT_MS;

use crate::console;
use crate::error::AgentError;
use crate::images::Overlay;
use crate::operations::{CancelToken, Operations};
use crate::proto::vm_service_server::VmService;
use crate::proto::{
    BalloonStatus, ConsoleChunk, CreateVmRequest, DeleteVmRequest, DeleteVmResponse, GetBalloonRequest,
    GetConsoleRequest, GetVmRequest, ListVmsRequest, ListVmsResponse, Operation, OperationKind,
    PauseVmRequest, RebootVmRequest, ResumeVmRequest, StartVmRequest, StopVmRequest, UpdateVmRequest, Vm,
    VmSpec, VmState, WatchEventType, WatchVmsEvent, WatchVmsRequest,
};
use crate::requests::{fingerprint, OperationCall, OperationStarter, Requests};
use crate::spec::{check_request_id, check_spec, check_vm_id, Selector};
use crate::state::Context;
use crate::store::StoreError;
use crate::supervisor::{Supervisor, DEFAULT_STOP_TIMEOUT};

/// Default and largest page of `ListVms`.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// Default console tail.
const DEFAULT_CONSOLE_TAIL: u64 = 64 * 1024;
/// Console chunks sent at once, and how often a follower looks for more.
const CONSOLE_CHUNK: usize = 64 * 1024;
const CONSOLE_POLL: Duration = Duration::from_millis(200);
/// Page tokens carry the last id of the previous page behind this prefix.
const PAGE_TOKEN_PREFIX: &str = "after:";

/// `VmService` on top of the supervisor and the store.
pub struct VmApi {
    ctx: Arc<Context>,
    supervisor: Arc<Supervisor>,
    ready: Arc<AtomicBool>,
    requests: Requests,
    starter: OperationStarter,
    /// Serializes the request-id check and insert of creates.
    create_lock: tokio::sync::Mutex<()>,
}

impl VmApi {
    /// Handlers answer UNAVAILABLE until `ready` is set (after re-adoption).
    pub fn new(
        ctx: Arc<Context>,
        supervisor: Arc<Supervisor>,
        ops: Arc<Operations>,
        ready: Arc<AtomicBool>,
    ) -> Self {
        let requests = Requests::new(ctx.store.clone());
        VmApi {
            starter: OperationStarter::new(ops, requests.clone()),
            requests,
            ctx,
            supervisor,
            ready,
            create_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn check_ready(&self) -> Result<(), AgentError> {
        crate::requests::check_ready(&self.ready)
    }

    /// Runs a per-VM lifecycle call with request-id replay.
    async fn lifecycle<R, F, Fut>(
        &self,
        method: &'static str,
        vm_id: &str,
        request_id: &str,
        fingerprint: Vec<u8>,
        act: F,
    ) -> Result<Vm, AgentError>
    where
        F: FnOnce(Arc<Supervisor>, String) -> Fut,
        Fut: std::future::Future<Output = Result<R, AgentError>>,
        R: Into<Vm>,
    {
        self.check_ready()?;
        check_vm_id("vm_id", vm_id)?;
        if let Some(vm) = self
            .requests
            .replay::<Vm>(request_id, method, &fingerprint)
            .await?
        {
            return Ok(vm);
        }
        let vm = act(self.supervisor.clone(), vm_id.to_string()).await?.into();
        self.requests.remember(request_id, method, fingerprint, vm).await
    }
}

impl VmApi {
    /// Starts `work` on a VM as an operation of `kind` and returns the operation at once, with
    /// request-id replay (a retry gets the same operation, as it is now).
    async fn start_operation<F, Fut>(
        &self,
        method: &'static str,
        kind: OperationKind,
        vm_id: &str,
        request_id: &str,
        fingerprint: Vec<u8>,
        work: F,
    ) -> Result<Operation, AgentError>
    where
        F: FnOnce(Arc<Supervisor>, String, CancelToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Vm, AgentError>> + Send + 'static,
    {
        self.check_ready()?;
        check_vm_id("vm_id", vm_id)?;
        let call = OperationCall {
            method,
            kind,
            vm_id,
            request_id,
            fingerprint,
        };
        let supervisor = self.supervisor.clone();
        let id = vm_id.to_string();
        self.starter
            .start(
                call,
                || async {
                    // Checked here, not in the operation: a typo should fail the call.
                    if self.supervisor.has(vm_id) {
                        Ok(())
                    } else {
                        Err(AgentError::VmNotFound(vm_id.to_string()))
                    }
                },
                move |(), handle| async move {
                    match work(supervisor, id, handle.cancel_token()).await {
                        Ok(vm) => handle.finish_vm(vm).await,
                        Err(e) => handle.fail(e).await,
                    }
                },
            )
            .await
    }
}

impl VmApi {
    /// Writes the images a CreateVm spec names into it (see `images::resolve_spec`) and returns
    /// the overlays to make once the VM is stored. NOT_FOUND for an image that is not there.
    async fn resolve_images(&self, vm_id: &str, spec: &mut VmSpec) -> Result<Vec<Overlay>, AgentError> {
        crate::images::check_spec_images(spec)?;
        let ids = crate::images::spec_image_ids(spec);
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found = self
            .ctx
            .store
            .call(move |s| {
                let mut images = HashMap::new();
                for id in ids {
                    let image = s.get_image(&id)?.ok_or(StoreError::ImageNotFound(id.clone()))?;
                    images.insert(id, image);
                }
                Ok(images)
            })
            .await?;
        crate::images::resolve_spec(spec, &found, &self.ctx.config.vm_dir(vm_id))
    }
}

fn stop_timeout(field: &str, timeout_ms: u64) -> Result<Duration, AgentError> {
    match timeout_ms {
        0 => Ok(DEFAULT_STOP_TIMEOUT),
        ms if ms > MAX_SHUTDOWN_TIMEOUT_MS => Err(AgentError::invalid(
            field,
            format!("at most {MAX_SHUTDOWN_TIMEOUT_MS} ms"),
        )),
        ms => Ok(Duration::from_millis(ms)),
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl VmService for VmApi {
    async fn create_vm(&self, request: Request<CreateVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_request_id(&req.request_id)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let guard = self.create_lock.lock().await;
        // Before validation: a retry gets its first answer even if, say, the kernel file has gone.
        if let Some(vm) = self
            .requests
            .replay::<Vm>(&req.request_id, "CreateVm", &fp)
            .await?
        {
            return Ok(Response::new(vm));
        }
        check_vm_id("vm_id", &req.vm_id)?;
        // The derived MACs and the agent's NIC defaults are part of the stored spec, so that GetVm
        // shows what the guest gets and a later start does not depend on the agent's flags.
        let mut spec = req.spec.clone();
        if let Some(s) = spec.as_mut() {
            crate::nics::fill_macs(&req.vm_id, s);
            let config = &self.ctx.config;
            crate::nics::fill_nic_defaults(s, config.bridge.as_deref(), config.nic_mtu);
        }
        let overlays = match spec.as_mut() {
            Some(s) => self.resolve_images(&req.vm_id, s).await?,
            None => Vec::new(),
        };
        let spec = check_spec(spec.as_ref())?.clone();
        let image_ids = crate::images::spec_image_ids(&spec);
        let vm = Vm {
            vm_id: req.vm_id.clone(),
            spec: Some(spec),
            state: VmState::Starting as i32,
            desired_state: VmState::Running as i32,
            ..Default::default()
        };
        let limit = self.ctx.config.allocatable;
        let rid = req.request_id.clone();
        let fp2 = fp.clone();
        let vm = self
            .ctx
            .store
            .call(move |s| {
                let record = (!rid.is_empty()).then_some((rid.as_str(), "CreateVm", fp2.as_slice()));
                // Under the store's lock, as DeleteImage's use check: neither passes the other.
                s.check_images_exist(&image_ids)?;
                s.create_vm(vm, Some(limit), record)
            })
            .await?;
        // Under the lock, so that a call that sees the stored VM also finds its actor.
        self.supervisor.add(vm);
        if !overlays.is_empty() {
            // Only now: the VM id was new, so nothing of another VM's is in its directory.
            let made = tokio::task::spawn_blocking(move || crate::images::create_overlays(&overlays))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            if let Err(e) = made {
                let _ = self.supervisor.delete(&req.vm_id).await;
                let rid = req.request_id.clone();
                let _ = self.ctx.store.call(move |s| s.forget_request(&rid)).await;
                return Err(AgentError::Internal(format!(
                    "creating the overlays of VM '{}': {e}",
                    req.vm_id
                ))
                .into());
            }
        }
        drop(guard);
        let vm = self.supervisor.start(&req.vm_id).await?;
        if !req.request_id.is_empty() {
            // A retry gets the VM as this call returned it (the record made with the insert above
            // holds it as created, in case the agent dies before this point).
            let (rid, encoded) = (req.request_id.clone(), vm.encode_to_vec());
            self.ctx
                .store
                .call(move |s| s.update_request(&rid, &encoded))
                .await?;
        }
        Ok(Response::new(vm))
    }

    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_vm_id("vm_id", &req.vm_id)?;
        let id = req.vm_id.clone();
        let vm = self.ctx.store.call(move |s| s.get_vm(&id)).await?;
        vm.map(Response::new)
            .ok_or_else(|| AgentError::VmNotFound(req.vm_id).into())
    }

    async fn list_vms(&self, request: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        let selector = Selector::parse(&req.label_selector)?;
        let mut states = Vec::new();
        for (i, s) in req.states.iter().enumerate() {
            match VmState::try_from(*s) {
                Ok(VmState::Unspecified) | Err(_) => {
                    return Err(AgentError::invalid(format!("states[{i}]"), "unknown state").into())
                }
                Ok(state) => states.push(state),
            }
        }
        let after = match req.page_token.as_str() {
            "" => None,
            t => match t.strip_prefix(PAGE_TOKEN_PREFIX) {
                Some(id) if check_vm_id("page_token", id).is_ok() => Some(id.to_string()),
                _ => return Err(AgentError::invalid("page_token", "not a token from ListVms").into()),
            },
        };
        let page_size = match req.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let all = self.ctx.store.call(|s| s.list_vms()).await?;
        let mut matching = all.into_iter().filter(|vm| {
            after.as_ref().is_none_or(|a| vm.vm_id.as_str() > a.as_str())
                && (states.is_empty() || states.contains(&vm.state()))
                && selector.matches(&vm.spec.as_ref().map(|s| s.labels.clone()).unwrap_or_default())
        });
        let vms: Vec<Vm> = matching.by_ref().take(page_size).collect();
        let next_page_token = match (matching.next(), vms.last()) {
            (Some(_), Some(last)) => format!("{PAGE_TOKEN_PREFIX}{}", last.vm_id),
            _ => String::new(),
        };
        Ok(Response::new(ListVmsResponse { vms, next_page_token }))
    }

    async fn start_vm(&self, request: Request<StartVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let vm = self
            .lifecycle("StartVm", &req.vm_id, &req.request_id, fp, |s, id| async move {
                s.start(&id).await
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn stop_vm(&self, request: Request<StopVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        let timeout = stop_timeout("timeout_ms", req.timeout_ms)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let force = req.force;
        let vm = self
            .lifecycle("StopVm", &req.vm_id, &req.request_id, fp, |s, id| async move {
                s.stop(&id, timeout, force, CancelToken::never()).await
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn pause_vm(&self, request: Request<PauseVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let vm = self
            .lifecycle("PauseVm", &req.vm_id, &req.request_id, fp, |s, id| async move {
                s.pause(&id).await
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn resume_vm(&self, request: Request<ResumeVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let vm = self
            .lifecycle("ResumeVm", &req.vm_id, &req.request_id, fp, |s, id| async move {
                s.resume(&id).await
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn reboot_vm(&self, request: Request<RebootVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        let timeout = stop_timeout("timeout_ms", req.timeout_ms)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let vm = self
            .lifecycle("RebootVm", &req.vm_id, &req.request_id, fp, |s, id| async move {
                s.reboot(&id, timeout, CancelToken::never()).await
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn stop_vm_async(&self, request: Request<StopVmRequest>) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        let timeout = stop_timeout("timeout_ms", req.timeout_ms)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let force = req.force;
        let op = self
            .start_operation(
                "StopVmAsync",
                OperationKind::StopVm,
                &req.vm_id,
                &req.request_id,
                fp,
                move |s, id, cancel| async move { s.stop(&id, timeout, force, cancel).await },
            )
            .await?;
        Ok(Response::new(op))
    }

    async fn reboot_vm_async(
        &self,
        request: Request<RebootVmRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        let timeout = stop_timeout("timeout_ms", req.timeout_ms)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let op = self
            .start_operation(
                "RebootVmAsync",
                OperationKind::RebootVm,
                &req.vm_id,
                &req.request_id,
                fp,
                move |s, id, cancel| async move { s.reboot(&id, timeout, cancel).await },
            )
            .await?;
        Ok(Response::new(op))
    }

    async fn delete_vm(
        &self,
        request: Request<DeleteVmRequest>,
    ) -> Result<Response<DeleteVmResponse>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_vm_id("vm_id", &req.vm_id)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        if let Some(done) = self
            .requests
            .replay::<DeleteVmResponse>(&req.request_id, "DeleteVm", &fp)
            .await?
        {
            return Ok(Response::new(done));
        }
        self.supervisor.delete(&req.vm_id).await?;
        let done = self
            .requests
            .remember(&req.request_id, "DeleteVm", fp, DeleteVmResponse {})
            .await?;
        Ok(Response::new(done))
    }

    type WatchVmsStream = Stream<WatchVmsEvent>;

    async fn watch_vms(
        &self,
        request: Request<WatchVmsRequest>,
    ) -> Result<Response<Self::WatchVmsStream>, Status> {
        let from = request.into_inner().from_revision;
        self.check_ready()?;
        // Subscribing and reading happen under the store's lock, so no event falls in between.
        let (live, first, revision) = self
            .ctx
            .store
            .call(move |s| {
                let live = s.subscribe();
                let revision = s.revision()?;
                let first = if from == 0 {
                    let mut events: Vec<WatchVmsEvent> = s
                        .list_vms()?
                        .into_iter()
                        .map(|vm| WatchVmsEvent {
                            revision,
                            r#type: WatchEventType::Snapshot as i32,
                            vm: Some(vm),
                        })
                        .collect();
                    events.push(WatchVmsEvent {
                        revision,
                        r#type: WatchEventType::Synced as i32,
                        vm: None,
                    });
                    events
                } else {
                    s.events_after(from)?
                };
                Ok((live, first, revision))
            })
            .await?;
        let (tx, rx) = mpsc::channel(256);
        let store = self.ctx.store.clone();
        tokio::spawn(async move {
            let mut last = revision;
            for event in first {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            let mut live = live;
            loop {
                let received = tokio::select! {
                    r = live.recv() => r,
                    _ = tx.closed() => return,
                };
                let events = match received {
                    Ok(event) => vec![event],
                    // Too slow: read what was missed from the database.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        match store.call(move |s| s.events_after(last)).await {
                            Ok(events) => events,
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                for event in events {
                    if event.revision <= last {
                        continue;
                    }
                    last = event.revision;
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type GetConsoleStream = Stream<ConsoleChunk>;

    async fn get_console(
        &self,
        request: Request<GetConsoleRequest>,
    ) -> Result<Response<Self::GetConsoleStream>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_vm_id("vm_id", &req.vm_id)?;
        let id = req.vm_id.clone();
        if self.ctx.store.call(move |s| s.get_vm(&id)).await?.is_none() {
            return Err(AgentError::VmNotFound(req.vm_id).into());
        }
        let tail = match req.tail_bytes {
            0 => DEFAULT_CONSOLE_TAIL,
            n => n,
        }
        .min(self.ctx.config.console_log_max_bytes);
        let path = self.ctx.config.console_log(&req.vm_id);
        let dir = self.ctx.config.vm_dir(&req.vm_id);
        let follow = req.follow;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut file = None;
            let mut offset = 0;
            loop {
                if file.is_none() {
                    if let Ok(f) = std::fs::File::open(&path) {
                        offset = console::tail_offset(&f, tail).unwrap_or(0);
                        file = Some(f);
                    }
                }
                if let Some(f) = file.as_mut() {
                    loop {
                        let Ok((data, next)) = console::read_from(f, offset, CONSOLE_CHUNK) else {
                            return;
                        };
                        offset = next;
                        if data.is_empty() {
                            break;
                        }
                        if tx.send(Ok(ConsoleChunk { data })).await.is_err() {
                            return;
                        }
                    }
                }
                // The VM was deleted: nothing more will come.
                if !follow || !dir.exists() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(CONSOLE_POLL) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn update_vm(&self, request: Request<UpdateVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let (vm_id, request_id) = (req.vm_id.clone(), req.request_id.clone());
        let vm = self
            .lifecycle("UpdateVm", &vm_id, &request_id, fp, |s, id| async move {
                s.update(&id, req).await
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn get_balloon(
        &self,
        request: Request<GetBalloonRequest>,
    ) -> Result<Response<BalloonStatus>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_vm_id("vm_id", &req.vm_id)?;
        Ok(Response::new(self.supervisor.balloon(&req.vm_id).await?))
    }
}
