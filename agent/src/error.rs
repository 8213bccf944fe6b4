//! The agent's errors, and the one place where they become gRPC statuses.
//!
//! Handlers and the supervisor return [`AgentError`]; `From<AgentError> for tonic::Status` picks the
//! code. Messages are written for people and never carry `Debug` output: internal failures are logged
//! in full and reported on the wire with a short, fixed text.

use tonic::{Code, Status};

use crate::proto::OperationError;
use crate::store::StoreError;

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A request field is invalid; `field` is its path in the request, e.g. `spec.vcpus`.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No VM with this id.
    #[error("no VM with id '{0}'")]
    VmNotFound(String),
    /// A VM with this id exists (created by a different request).
    #[error("a VM with id '{0}' already exists")]
    VmExists(String),
    /// The VM is in a state that does not allow the request.
    #[error("{0}")]
    WrongState(String),
    /// The host cannot fit the VM.
    #[error("{0}")]
    Exhausted(String),
    /// The agent is not ready (still re-adopting its VMs at start).
    #[error("{0}")]
    Unavailable(String),
    /// A watch asked for revisions that are no longer kept.
    #[error("{0}")]
    OutOfRange(String),
    /// No snapshot with this id.
    #[error("no snapshot with id '{0}'")]
    SnapshotNotFound(String),
    /// A snapshot with this id exists.
    #[error("a snapshot with id '{0}' already exists")]
    SnapshotExists(String),
    /// No image with this id.
    #[error("no image with id '{0}'")]
    ImageNotFound(String),
    /// An image with this id exists (or is being registered).
    #[error("{0}")]
    ImageExists(String),
    /// No operation with this name.
    #[error("no operation named '{0}'")]
    OperationNotFound(String),
    /// The work was cancelled on request (an operation's outcome).
    #[error("{0}")]
    Cancelled(String),
    /// The work was cut short by something outside the request, such as an agent restart.
    #[error("{0}")]
    Aborted(String),
    /// The client's role does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    /// The state database failed.
    #[error("state store")]
    Store(#[source] StoreError),
    /// Something else failed inside the agent (logged with details).
    #[error("{0}")]
    Internal(String),
    /// Another host's agent refused or failed; its status code is kept.
    #[error("the destination agent: {1}")]
    Peer(Code, String),
}

impl AgentError {
    /// An invalid request field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        AgentError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The status code and the message on the wire for `err`. Internal failures are logged here with
/// their details and reported with a fixed text.
fn status_parts(err: &AgentError) -> (Code, String) {
    let code = match err {
        AgentError::InvalidArgument { .. } => Code::InvalidArgument,
        AgentError::VmNotFound(_)
        | AgentError::OperationNotFound(_)
        | AgentError::SnapshotNotFound(_)
        | AgentError::ImageNotFound(_) => Code::NotFound,
        AgentError::VmExists(_) | AgentError::SnapshotExists(_) | AgentError::ImageExists(_) => {
            Code::AlreadyExists
        }
        AgentError::WrongState(_) => Code::FailedPrecondition,
        AgentError::Exhausted(_) => Code::ResourceExhausted,
        AgentError::Unavailable(_) => Code::Unavailable,
        AgentError::OutOfRange(_) => Code::OutOfRange,
        AgentError::Cancelled(_) => Code::Cancelled,
        AgentError::Aborted(_) => Code::Aborted,
        AgentError::PermissionDenied(_) => Code::PermissionDenied,
        AgentError::Store(_) | AgentError::Internal(_) => Code::Internal,
        // Its internal failures are not ours: the peer is what is unavailable.
        AgentError::Peer(Code::Internal | Code::Unknown, _) => Code::Unavailable,
        AgentError::Peer(code, _) => *code,
    };
    if code == Code::Internal {
        // The details (paths, SQLite messages) go to the log, not to the client.
        tracing::error!(error = %ErrorChain(err), "internal error");
        return (code, "internal error in the agent (see its log)".to_string());
    }
    (code, err.to_string())
}

impl From<AgentError> for Status {
    fn from(err: AgentError) -> Status {
        let (code, message) = status_parts(&err);
        Status::new(code, message)
    }
}

/// The outcome of a failed operation, with the code and message the same error would have as a
/// status.
pub fn operation_error(err: &AgentError) -> OperationError {
    let (code, message) = status_parts(err);
    OperationError {
        code: code as i32,
        message,
    }
}

impl From<StoreError> for AgentError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Exists(id) => AgentError::VmExists(id),
            StoreError::NotFound(id) => AgentError::VmNotFound(id),
            StoreError::SnapshotExists(id) => AgentError::SnapshotExists(id),
            StoreError::SnapshotNotFound(id) => AgentError::SnapshotNotFound(id),
            StoreError::SnapshotInUse(why) => AgentError::WrongState(why),
            e @ StoreError::ImageExists(_) => AgentError::ImageExists(e.to_string()),
            StoreError::ImageNotFound(id) => AgentError::ImageNotFound(id),
            StoreError::ImageInUse(why) => AgentError::WrongState(why),
            StoreError::Exhausted(why) => AgentError::Exhausted(why),
            e @ StoreError::Compacted { .. } => AgentError::OutOfRange(e.to_string()),
            e => AgentError::Store(e),
        }
    }
}

/// Displays an error with its sources, `a: b: c`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let s = Status::from(AgentError::invalid("spec.vcpus", "must be 1 to 32"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "spec.vcpus: must be 1 to 32");
        assert_eq!(
            Status::from(AgentError::VmNotFound("a".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            Status::from(AgentError::VmExists("a".into())).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            Status::from(AgentError::WrongState("x".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            Status::from(AgentError::ImageNotFound("a".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            Status::from(AgentError::from(StoreError::ImageExists("a".into()))).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            Status::from(AgentError::from(StoreError::ImageInUse("x".into()))).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            Status::from(AgentError::Exhausted("x".into())).code(),
            Code::ResourceExhausted
        );
        let s = Status::from(AgentError::Internal("/secret/path: EIO".into()));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
        let e = operation_error(&AgentError::Internal("/secret/path: EIO".into()));
        assert_eq!(e.code, Code::Internal as i32);
        assert!(!e.message.contains("secret"));
        let e = operation_error(&AgentError::Aborted("the agent restarted".into()));
        assert_eq!((e.code, e.message.as_str()), (10, "the agent restarted"));
        assert_eq!(
            operation_error(&AgentError::Cancelled("x".into())).code,
            Code::Cancelled as i32
        );
    }
}
