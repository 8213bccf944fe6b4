//! What every service's mutating calls share: `request_id` replay (a retry with the same id gets
//! the first call's answer instead of acting again) and the start of long-running operations.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prost::Message;

use crate::error::AgentError;
use crate::operations::{OperationHandle, Operations};
use crate::proto::{Operation, OperationKind};
use crate::spec::check_request_id;
use crate::state::StoreHandle;

/// UNAVAILABLE until `ready` is set (the agent re-adopts its VMs before it serves).
pub fn check_ready(ready: &AtomicBool) -> Result<(), AgentError> {
    if ready.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(AgentError::Unavailable(
            "the agent is re-adopting its VMs; try again shortly".into(),
        ))
    }
}

/// The request's encoding without its request id: what a retry must repeat exactly.
pub fn fingerprint<T: Message + Clone>(request: &T, clear: impl FnOnce(&mut T)) -> Vec<u8> {
    let mut r = request.clone();
    clear(&mut r);
    r.encode_to_vec()
}

/// Remembered answers by request id, in the store.
#[derive(Clone)]
pub struct Requests {
    store: StoreHandle,
}

impl Requests {
    /// Answers remembered in `store`.
    pub fn new(store: StoreHandle) -> Self {
        Requests { store }
    }

    /// The first answer to `request_id`, if this request was seen; INVALID_ARGUMENT if the id was
    /// used for a different request.
    pub async fn replay<T: Message + Default>(
        &self,
        request_id: &str,
        method: &'static str,
        fingerprint: &[u8],
    ) -> Result<Option<T>, AgentError> {
        check_request_id(request_id)?;
        if request_id.is_empty() {
            return Ok(None);
        }
        let id = request_id.to_string();
        let Some(stored) = self.store.call(move |s| s.find_request(&id)).await? else {
            return Ok(None);
        };
        if stored.method != method || stored.fingerprint != fingerprint {
            return Err(AgentError::invalid(
                "request_id",
                "already used for a different request",
            ));
        }
        let answer = T::decode(stored.response.as_slice())
            .map_err(|e| AgentError::Internal(format!("stored answer: {e}")))?;
        Ok(Some(answer))
    }

    /// Remembers `answer` for `request_id` and returns the answer remembered first.
    pub async fn remember<T: Message + Default>(
        &self,
        request_id: &str,
        method: &'static str,
        fingerprint: Vec<u8>,
        answer: T,
    ) -> Result<T, AgentError> {
        if request_id.is_empty() {
            return Ok(answer);
        }
        let id = request_id.to_string();
        let encoded = answer.encode_to_vec();
        let stored = self
            .store
            .call(move |s| s.record_request(&id, method, &fingerprint, &encoded))
            .await?;
        T::decode(stored.response.as_slice()).map_err(|e| AgentError::Internal(format!("stored answer: {e}")))
    }
}

/// What a call that starts an operation is.
pub struct OperationCall<'a> {
    /// The RPC, for request-id replay.
    pub method: &'static str,
    /// The operation's kind.
    pub kind: OperationKind,
    /// The VM it acts on (for a restore: the new VM).
    pub vm_id: &'a str,
    /// The request id, possibly empty.
    pub request_id: &'a str,
    /// See [`fingerprint`].
    pub fingerprint: Vec<u8>,
}

/// Starts operations with request-id replay, one start at a time, so that two racing retries
/// cannot start two operations.
pub struct OperationStarter {
    ops: Arc<Operations>,
    requests: Requests,
    lock: tokio::sync::Mutex<()>,
}

impl OperationStarter {
    /// Starts operations in `ops`, remembering them in `requests`.
    pub fn new(ops: Arc<Operations>, requests: Requests) -> Self {
        OperationStarter {
            ops,
            requests,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Returns the operation a retry of `call` started (as it is now); otherwise runs `prepare`
    /// (what can fail at once, as a status: checks, records that must exist from the start), then
    /// starts the operation, spawns `work` with what `prepare` returned and the operation's handle
    /// (which `work` must finish or fail), and returns the operation as it began.
    pub async fn start<P, Prep, PrepFut, Work, WorkFut>(
        &self,
        call: OperationCall<'_>,
        prepare: Prep,
        work: Work,
    ) -> Result<Operation, AgentError>
    where
        Prep: FnOnce() -> PrepFut,
        PrepFut: Future<Output = Result<P, AgentError>>,
        Work: FnOnce(P, OperationHandle) -> WorkFut + Send + 'static,
        WorkFut: Future<Output = ()> + Send + 'static,
        P: Send + 'static,
    {
        let _guard = self.lock.lock().await;
        let replayed = self
            .requests
            .replay::<Operation>(call.request_id, call.method, &call.fingerprint)
            .await?;
        if let Some(first) = replayed {
            return match self.ops.get(&first.name).await {
                Ok(now) => Ok(now),
                // Pruned since: what the first call answered is all there is.
                Err(AgentError::OperationNotFound(_)) => Ok(first),
                Err(e) => Err(e),
            };
        }
        let prepared = prepare().await?;
        let handle = self.ops.start(call.kind, call.vm_id).await?;
        let first = handle.operation().await?;
        let first = self
            .requests
            .remember(call.request_id, call.method, call.fingerprint, first)
            .await?;
        tokio::spawn(work(prepared, handle));
        Ok(first)
    }
}
