//! Connecting a gRPC client to an agent, for `vmmctl` and the tests.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why an endpoint could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Not `unix:PATH`.
    #[error("endpoint must be unix:PATH, got '{0}'")]
    BadEndpoint(String),
    /// Connecting failed.
    #[error("cannot connect")]
    Transport(#[from] tonic::transport::Error),
}

/// A channel to the agent at `endpoint` (`unix:PATH`).
pub async fn connect(endpoint: &str) -> Result<Channel, ConnectError> {
    let path = endpoint
        .strip_prefix("unix:")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ConnectError::BadEndpoint(endpoint.to_string()))?;
    connect_unix(PathBuf::from(path)).await
}

/// A channel over the Unix socket at `path`.
pub async fn connect_unix(path: PathBuf) -> Result<Channel, ConnectError> {
    // The URI is a placeholder: the connector below ignores it.
    let channel = Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}
