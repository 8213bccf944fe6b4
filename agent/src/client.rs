//! Connecting a gRPC client to an agent, for `vmmctl` and the tests: `unix:PATH`, or
//! `tcp://HOST:PORT` with mutual TLS (or without TLS, for an agent run with `--insecure-tcp`).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::Authority;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// Why an endpoint could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Neither `unix:PATH` nor `tcp://HOST:PORT`.
    #[error("endpoint must be unix:PATH or tcp://HOST:PORT, got '{0}'")]
    BadEndpoint(String),
    /// TLS settings for a Unix socket.
    #[error("TLS settings apply to tcp:// endpoints only")]
    TlsOnUnix,
    /// Connecting failed.
    #[error("cannot connect")]
    Transport(#[from] tonic::transport::Error),
}

/// The client side of mutual TLS, as PEM.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA that the agent's certificate must chain to.
    pub ca: Vec<u8>,
    /// Our certificate and key (the agent refuses clients without one).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A channel to the agent at `endpoint`: `unix:PATH`, or `tcp://HOST:PORT` (TLS with `tls`, plain
/// without).
pub async fn connect(endpoint: &str, tls: Option<ClientTls>) -> Result<Channel, ConnectError> {
    if let Some(path) = endpoint.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ConnectError::BadEndpoint(endpoint.to_string()));
        }
        if tls.is_some() {
            return Err(ConnectError::TlsOnUnix);
        }
        return connect_unix(PathBuf::from(path)).await;
    }
    let authority = endpoint
        .strip_prefix("tcp://")
        .filter(|a| a.parse::<Authority>().is_ok_and(|a| a.port().is_some()))
        .ok_or_else(|| ConnectError::BadEndpoint(endpoint.to_string()))?;
    connect_tcp(authority, tls).await
}

/// A channel over TCP to `authority` (`HOST:PORT`).
pub async fn connect_tcp(authority: &str, tls: Option<ClientTls>) -> Result<Channel, ConnectError> {
    let endpoint = match tls {
        None => Endpoint::from_shared(format!("http://{authority}"))?,
        Some(tls) => {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca));
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            Endpoint::from_shared(format!("https://{authority}"))?.tls_config(config)?
        }
    };
    Ok(endpoint.connect().await?)
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
