//! Where the agent serves gRPC: `--listen` addresses and the TLS settings that go with them.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The files of the agent's TLS identity and of the CA its clients' certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA (PEM, one or more certificates) that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// One address the agent serves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket (mode 0660): whoever may connect is admin.
    Unix(PathBuf),
    /// TCP with mutual TLS: clients need a certificate from the client CA, which names their role.
    Tls {
        /// Address and port.
        addr: SocketAddr,
        /// Identity and client CA.
        tls: TlsFiles,
    },
    /// Plain TCP on a loopback address (`--insecure-tcp`, for development): every process of the
    /// host that can connect is admin.
    InsecureTcp(SocketAddr),
}

/// Why a `--listen` value or its TLS flags are refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenError {
    /// Neither `unix:PATH` nor `tcp://ADDR:PORT`.
    #[error("--listen must be unix:PATH or tcp://ADDR:PORT (ADDR an IP address), got '{0}'")]
    Syntax(String),
    /// TCP without TLS and without `--insecure-tcp`.
    #[error(
        "--listen {0} needs mutual TLS: --tls-cert, --tls-key and --tls-client-ca \
         (or --insecure-tcp, on a loopback address only)"
    )]
    NeedsTls(String),
    /// `--insecure-tcp` on an address other hosts can reach.
    #[error("--insecure-tcp serves only loopback addresses, not {0}")]
    InsecureNotLoopback(SocketAddr),
    /// Some but not all TLS flags.
    #[error("--tls-cert, --tls-key and --tls-client-ca go together")]
    PartialTls,
    /// Both TLS and `--insecure-tcp`.
    #[error("--insecure-tcp and the --tls-* flags exclude each other")]
    TlsAndInsecure,
}

/// The TLS files from the three flags: all or none.
pub fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<TlsFiles>, ListenError> {
    match (cert, key, client_ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(client_ca)) => Ok(Some(TlsFiles { cert, key, client_ca })),
        _ => Err(ListenError::PartialTls),
    }
}

/// Parses one `--listen` value: `unix:PATH` or `tcp://ADDR:PORT`, with TLS on TCP unless
/// `insecure` (loopback only).
pub fn parse_listen(value: &str, tls: Option<&TlsFiles>, insecure: bool) -> Result<Listen, ListenError> {
    if tls.is_some() && insecure {
        return Err(ListenError::TlsAndInsecure);
    }
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ListenError::Syntax(value.to_string()));
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    let Some(addr) = value.strip_prefix("tcp://") else {
        return Err(ListenError::Syntax(value.to_string()));
    };
    let addr: SocketAddr = addr.parse().map_err(|_| ListenError::Syntax(value.to_string()))?;
    match (tls, insecure) {
        (Some(tls), _) => Ok(Listen::Tls {
            addr,
            tls: tls.clone(),
        }),
        (None, true) if addr.ip().is_loopback() => Ok(Listen::InsecureTcp(addr)),
        (None, true) => Err(ListenError::InsecureNotLoopback(addr)),
        (None, false) => Err(ListenError::NeedsTls(value.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values() {
        let tls = TlsFiles {
            cert: "/c".into(),
            key: "/k".into(),
            client_ca: "/ca".into(),
        };
        assert_eq!(
            parse_listen("unix:/run/a.sock", None, false),
            Ok(Listen::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            parse_listen("tcp://0.0.0.0:7443", Some(&tls), false),
            Ok(Listen::Tls {
                addr: "0.0.0.0:7443".parse().unwrap(),
                tls: tls.clone()
            })
        );
        assert_eq!(
            parse_listen("tcp://[::1]:7000", None, true),
            Ok(Listen::InsecureTcp("[::1]:7000".parse().unwrap()))
        );
        assert!(matches!(
            parse_listen("tcp://0.0.0.0:7443", None, false),
            Err(ListenError::NeedsTls(_))
        ));
        assert!(matches!(
            parse_listen("tcp://10.0.0.1:7443", None, true),
            Err(ListenError::InsecureNotLoopback(_))
        ));
        assert_eq!(
            parse_listen("tcp://127.0.0.1:1", Some(&tls), true),
            Err(ListenError::TlsAndInsecure)
        );
        for bad in [
            "unix:",
            "tcp://host:80",
            "tcp://1.2.3.4",
            "http://1.2.3.4:80",
            "/path",
        ] {
            assert!(
                matches!(parse_listen(bad, Some(&tls), false), Err(ListenError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(tls_files(None, None, None), Ok(None));
        assert_eq!(
            tls_files(Some("/c".into()), None, Some("/ca".into())),
            Err(ListenError::PartialTls)
        );
    }
}
