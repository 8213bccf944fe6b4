//! Long-running operations: the internal API that work taking long (stop and reboot now; snapshot,
//! restore and migration later) reports through, and what `OperationsService` reads.
//!
//! [`Operations::start`] records a new operation and returns its [`OperationHandle`]; the worker
//! reports `progress`, ends with `finish` or `fail`, and watches its [`CancelToken`]. Every
//! operation is in the store from its start, so that a restarted agent still knows it: operations
//! that were running when an agent died are finished with ABORTED at the next start
//! ([`Operations::recover`]). A running operation also lives in memory, where `WaitOperation`
//! waits on its changes and `CancelOperation` reaches its worker.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{operation_error, AgentError};
use crate::proto::{
    operation, operation_response, Operation, OperationKind, OperationMetadata, OperationProgress,
    OperationResponse, Vm,
};
use crate::state::StoreHandle;
use crate::store::{now_ms, OperationFilter};

/// Every operation name starts with this.
pub const NAME_PREFIX: &str = "operations/";
/// Progress is written to the store at most this often (it is in memory at once); the start,
/// the end and cancel requests are written at once.
const PROGRESS_PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// What the operations left running by a previous agent are finished with.
pub const ABORTED_MESSAGE: &str = "the agent stopped (crashed or restarted) while this operation ran; \
     its work was cut short and may be half done: check the VM's state";

/// Whether the operation's worker was asked to stop early. Cloned into whatever does the work
/// (e.g. a VM's actor); cancellation is cooperative, so the worker decides where to look at it.
#[derive(Debug, Clone)]
pub struct CancelToken(watch::Receiver<bool>);

impl CancelToken {
    /// A token that is never cancelled, for work that no operation tracks.
    pub fn never() -> Self {
        let (_tx, rx) = watch::channel(false);
        CancelToken(rx)
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once cancellation is asked for; never, if it cannot be any more.
    pub async fn cancelled(&mut self) {
        if self.0.wait_for(|c| *c).await.is_err() {
            // The operation ended, or the token is `never()`: nobody can cancel it now.
            std::future::pending::<()>().await;
        }
    }
}

/// A running operation, in memory.
struct Live {
    state: watch::Sender<Operation>,
    cancel: watch::Sender<bool>,
}

/// The operations of this agent.
pub struct Operations {
    store: StoreHandle,
    live: Mutex<HashMap<String, Live>>,
    counter: AtomicU64,
    random: RandomState,
}

/// Checks an operation name from a request.
pub fn check_name(field: &str, name: &str) -> Result<(), AgentError> {
    let ok = name.strip_prefix(NAME_PREFIX).is_some_and(|id| {
        (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if ok {
        Ok(())
    } else {
        Err(AgentError::invalid(
            field,
            format!("must be {NAME_PREFIX}<id>, the id 1-64 of a-z 0-9 -"),
        ))
    }
}

impl Operations {
    /// Operations kept in `store`.
    pub fn new(store: StoreHandle) -> Arc<Self> {
        Arc::new(Operations {
            store,
            live: Mutex::default(),
            counter: AtomicU64::new(0),
            random: RandomState::new(),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finishes with ABORTED every operation a previous agent left running. Call before serving.
    pub async fn recover(&self) -> Result<usize, AgentError> {
        let error = operation_error(&AgentError::Aborted(ABORTED_MESSAGE.into()));
        self.store
            .call(move |s| s.abort_unfinished_operations(&error))
            .await
    }

    /// A new unique name: time first (names sort roughly by age), then randomness, so that two
    /// agents' lifetimes never collide.
    fn new_name(&self) -> String {
        let mut h = self.random.build_hasher();
        h.write_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        format!("{NAME_PREFIX}{:011x}-{:016x}", now_ms(), h.finish())
    }

    /// Records a new operation of `kind` on `vm_id` and returns the handle its worker reports
    /// through.
    pub async fn start(
        self: &Arc<Self>,
        kind: OperationKind,
        vm_id: &str,
    ) -> Result<OperationHandle, AgentError> {
        let now = now_ms();
        let op = Operation {
            name: self.new_name(),
            metadata: Some(OperationMetadata {
                kind: kind as i32,
                vm_id: vm_id.to_string(),
                progress: Some(OperationProgress::default()),
                create_time_ms: now,
                update_time_ms: now,
                cancel_requested: false,
            }),
            done: false,
            result: None,
        };
        let stored = op.clone();
        self.store.call(move |s| s.insert_operation(&stored)).await?;
        let (state, _) = watch::channel(op.clone());
        let (cancel, cancel_rx) = watch::channel(false);
        self.live().insert(op.name.clone(), Live { state, cancel });
        Ok(OperationHandle {
            ops: Some(self.clone()),
            name: op.name,
            cancel: CancelToken(cancel_rx),
            last_persist: Instant::now(),
        })
    }

    /// The operation as it is now.
    pub async fn get(&self, name: &str) -> Result<Operation, AgentError> {
        if let Some(live) = self.live().get(name) {
            return Ok(live.state.borrow().clone());
        }
        let n = name.to_string();
        self.store
            .call(move |s| s.get_operation(&n))
            .await?
            .ok_or_else(|| AgentError::OperationNotFound(name.to_string()))
    }

    /// Up to `limit` operations, newest first, older than number `before`, with their numbers.
    pub async fn list(
        &self,
        filter: OperationFilter,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, Operation)>, AgentError> {
        let mut ops = self
            .store
            .call(move |s| s.list_operations(&filter, before, limit))
            .await?;
        // The store has progress only as of its last write; memory has it now.
        let live = self.live();
        for (_, op) in &mut ops {
            if let Some(l) = live.get(&op.name) {
                *op = l.state.borrow().clone();
            }
        }
        Ok(ops)
    }

    /// The operation once it is done, or as it is when `timeout` has passed.
    pub async fn wait(&self, name: &str, timeout: Duration) -> Result<Operation, AgentError> {
        let rx = self.live().get(name).map(|l| l.state.subscribe());
        let Some(mut rx) = rx else {
            // Not running (any more): the store has its final state. A worker writes the store
            // before it leaves memory, so nothing falls between.
            return self.get(name).await;
        };
        let _ = tokio::time::timeout(timeout, rx.wait_for(|op| op.done)).await;
        let op = rx.borrow().clone();
        Ok(op)
    }

    /// Asks a running operation's worker to stop; a finished operation stays as it is.
    pub async fn cancel(&self, name: &str) -> Result<Operation, AgentError> {
        let updated = {
            let live = self.live();
            live.get(name).map(|l| {
                l.state.send_modify(|op| {
                    if let Some(m) = op.metadata.as_mut() {
                        m.cancel_requested = true;
                        m.update_time_ms = now_ms();
                    }
                });
                let _ = l.cancel.send(true);
                let op = l.state.borrow().clone();
                op
            })
        };
        let Some(updated) = updated else {
            return self.get(name).await;
        };
        let stored = updated.clone();
        // If the worker finished meanwhile, its final record wins: it was written after this.
        if let Err(e) = self.store.call(move |s| s.update_operation(&stored)).await {
            tracing::warn!(operation = name, error = %e, "cannot record a cancel request");
        }
        Ok(updated)
    }

    /// Writes `op` to the store; a failed write is logged, since the operation goes on either way.
    async fn persist(&self, op: Operation) {
        let name = op.name.clone();
        if let Err(e) = self.store.call(move |s| s.update_operation(&op)).await {
            tracing::error!(operation = name, error = %e, "cannot record an operation");
        }
    }

    /// Ends an operation with `result`: in the store first, then in memory.
    async fn complete(&self, name: &str, result: operation::Result) {
        let done = {
            let live = self.live();
            let Some(l) = live.get(name) else { return };
            l.state.send_modify(|op| {
                op.done = true;
                op.result = Some(result);
                if let Some(m) = op.metadata.as_mut() {
                    m.update_time_ms = now_ms();
                }
            });
            let op = l.state.borrow().clone();
            op
        };
        self.persist(done).await;
        // Waiters hold receivers that already saw `done`; new ones read the store.
        self.live().remove(name);
    }
}

/// The worker's side of one running operation. Dropping it unfinished fails the operation.
pub struct OperationHandle {
    ops: Option<Arc<Operations>>,
    name: String,
    cancel: CancelToken,
    last_persist: Instant,
}

impl OperationHandle {
    /// The operation's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operation as it is now.
    pub async fn operation(&self) -> Result<Operation, AgentError> {
        match &self.ops {
            Some(ops) => ops.get(&self.name).await,
            None => Err(AgentError::OperationNotFound(self.name.clone())),
        }
    }

    /// A token for the code doing the work.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Whether the operation was asked to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Reports how many of `total_bytes` are done.
    pub async fn progress(&mut self, done_bytes: u64, total_bytes: u64) {
        let Some(ops) = self.ops.clone() else { return };
        let op = {
            let live = ops.live();
            let Some(l) = live.get(&self.name) else { return };
            l.state.send_modify(|op| {
                if let Some(m) = op.metadata.as_mut() {
                    m.progress = Some(OperationProgress {
                        done_bytes,
                        total_bytes,
                    });
                    m.update_time_ms = now_ms();
                }
            });
            let op = l.state.borrow().clone();
            op
        };
        if self.last_persist.elapsed() >= PROGRESS_PERSIST_INTERVAL {
            self.last_persist = Instant::now();
            ops.persist(op).await;
        }
    }

    /// Ends the operation successfully with `vm` as its response.
    pub async fn finish_vm(self, vm: Vm) {
        self.finish(OperationResponse {
            value: Some(operation_response::Value::Vm(vm)),
        })
        .await;
    }

    /// Ends the operation successfully.
    pub async fn finish(mut self, response: OperationResponse) {
        if let Some(ops) = self.ops.take() {
            ops.complete(&self.name, operation::Result::Response(response))
                .await;
        }
    }

    /// Ends the operation with `err`, reported with the code and message it would have as a
    /// status.
    pub async fn fail(mut self, err: AgentError) {
        if let Some(ops) = self.ops.take() {
            ops.complete(&self.name, operation::Result::Error(operation_error(&err)))
                .await;
        }
    }
}

impl Drop for OperationHandle {
    fn drop(&mut self) {
        // A worker that ended without a result (a bug, or its task was aborted) must not leave the
        // operation running forever.
        let Some(ops) = self.ops.take() else { return };
        let name = std::mem::take(&mut self.name);
        tracing::error!(operation = name, "operation ended without a result");
        let result = operation::Result::Error(operation_error(&AgentError::Internal(format!(
            "operation {name} ended without a result"
        ))));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { ops.complete(&name, result).await });
        }
    }
}

#[cfg(test)]
#[path = "operations_tests.rs"]
mod tests;
