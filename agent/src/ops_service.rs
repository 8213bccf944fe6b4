//! The gRPC handlers of `OperationsService`, on top of [`Operations`].

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::error::AgentError;
use crate::operations::{check_name, Operations};
use crate::proto::operations_service_server::OperationsService;
use crate::proto::{
    CancelOperationRequest, GetOperationRequest, ListOperationsRequest, ListOperationsResponse, Operation,
    OperationKind, WaitOperationRequest,
};
use crate::spec::check_vm_id;
use crate::store::OperationFilter;

/// Default and largest page of `ListOperations`.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// Default and longest `WaitOperation`.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT_MS: u64 = 600_000;
/// Page tokens carry the number of the last operation of the previous page.
const PAGE_TOKEN_PREFIX: &str = "before:";

/// `OperationsService`.
pub struct OperationsApi {
    ops: Arc<Operations>,
}

impl OperationsApi {
    /// Serves `ops`.
    pub fn new(ops: Arc<Operations>) -> Self {
        OperationsApi { ops }
    }
}

fn page_token(token: &str) -> Result<Option<i64>, AgentError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n > 0)
        .map(Some)
        .ok_or_else(|| AgentError::invalid("page_token", "not a token from ListOperations"))
}

#[tonic::async_trait]
impl OperationsService for OperationsApi {
    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        check_name("name", &req.name)?;
        Ok(Response::new(self.ops.get(&req.name).await?))
    }

    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let req = request.into_inner();
        let vm_id = match req.vm_id.as_str() {
            "" => None,
            id => {
                check_vm_id("vm_id", id)?;
                Some(id.to_string())
            }
        };
        let kind = match OperationKind::try_from(req.kind) {
            Ok(OperationKind::Unspecified) => None,
            Ok(kind) => Some(kind),
            Err(_) => return Err(AgentError::invalid("kind", "unknown operation kind").into()),
        };
        let before = page_token(&req.page_token)?;
        let page_size = match req.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let filter = OperationFilter {
            vm_id,
            kind,
            done: req.done,
        };
        // One more than the page: whether there is a next page.
        let mut ops = self.ops.list(filter, before, page_size + 1).await?;
        let next_page_token = if ops.len() > page_size {
            ops.truncate(page_size);
            ops.last()
                .map(|(seq, _)| format!("{PAGE_TOKEN_PREFIX}{seq}"))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListOperationsResponse {
            operations: ops.into_iter().map(|(_, op)| op).collect(),
            next_page_token,
        }))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        check_name("name", &req.name)?;
        let timeout = match req.timeout_ms {
            0 => DEFAULT_WAIT,
            ms if ms > MAX_WAIT_MS => {
                return Err(AgentError::invalid("timeout_ms", format!("at most {MAX_WAIT_MS}")).into())
            }
            ms => Duration::from_millis(ms),
        };
        Ok(Response::new(self.ops.wait(&req.name, timeout).await?))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        check_name("name", &req.name)?;
        Ok(Response::new(self.ops.cancel(&req.name).await?))
    }
}
