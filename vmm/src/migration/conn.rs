//! The migration connection: the stream the caller handed over, plain (a socket pair or a link
//! that never leaves the host) or wrapped in mutual TLS (between hosts). The source is the TLS
//! client and checks the destination's certificate and name; the destination accepts only a
//! client certificate from the same CA. Both sides finish the handshake before the first frame so
//! that a wrong certificate is reported as such, not as a broken stream.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use vmm_api::migration::MigrationTls;

/// Why the connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The certificates, key or name given are unusable.
    #[error("TLS settings: {0}")]
    Settings(String),
    /// The TLS handshake failed (the peer's certificate, or the peer's view of ours).
    #[error("TLS handshake: {0}")]
    Handshake(String),
    /// Setting the socket's timeouts failed.
    #[error("migration connection: {0}")]
    Io(#[from] std::io::Error),
}

/// A connected migration stream.
pub enum Conn {
    /// No encryption.
    Plain(UnixStream),
    /// Source side of mutual TLS.
    Client(Box<StreamOwned<ClientConnection, UnixStream>>),
    /// Destination side of mutual TLS.
    Server(Box<StreamOwned<ServerConnection, UnixStream>>),
}

impl Conn {
    /// Wraps `sock` as the source (TLS client when `tls` is given), after setting its timeouts.
    pub fn source(
        sock: UnixStream,
        tls: Option<&MigrationTls>,
        read_timeout: Duration,
        write_timeout: Duration,
    ) -> Result<Conn, ConnError> {
        set_timeouts(&sock, read_timeout, write_timeout)?;
        let Some(tls) = tls else {
            return Ok(Conn::Plain(sock));
        };
        let name = tls
            .server_name
            .clone()
            .ok_or_else(|| ConnError::Settings("the source needs the destination's server_name".into()))?;
        let name =
            ServerName::try_from(name).map_err(|e| ConnError::Settings(format!("server_name: {e}")))?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(settings)?
            .with_root_certificates(roots(&tls.ca_pem)?)
            .with_client_auth_cert(certs(&tls.cert_pem)?, key(&tls.key_pem)?)
            .map_err(settings)?;
        let conn = ClientConnection::new(Arc::new(config), name).map_err(settings)?;
        let mut stream = StreamOwned::new(conn, sock);
        handshake(&mut stream.conn, &mut stream.sock)?;
        Ok(Conn::Client(Box::new(stream)))
    }

    /// Wraps `sock` as the destination (TLS server when `tls` is given), after setting its
    /// timeouts.
    pub fn destination(
        sock: UnixStream,
        tls: Option<&MigrationTls>,
        read_timeout: Duration,
        write_timeout: Duration,
    ) -> Result<Conn, ConnError> {
        set_timeouts(&sock, read_timeout, write_timeout)?;
        let Some(tls) = tls else {
            return Ok(Conn::Plain(sock));
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&tls.ca_pem)?), provider())
            .build()
            .map_err(settings)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(settings)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&tls.cert_pem)?, key(&tls.key_pem)?)
            .map_err(settings)?;
        // One connection, never resumed: no session tickets to send or keep.
        config.send_tls13_tickets = 0;
        let conn = ServerConnection::new(Arc::new(config)).map_err(settings)?;
        let mut stream = StreamOwned::new(conn, sock);
        handshake(&mut stream.conn, &mut stream.sock)?;
        Ok(Conn::Server(Box::new(stream)))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Client(s) => s.read(buf),
            Conn::Server(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Client(s) => s.write(buf),
            Conn::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Client(s) => s.flush(),
            Conn::Server(s) => s.flush(),
        }
    }
}

fn set_timeouts(sock: &UnixStream, read: Duration, write: Duration) -> std::io::Result<()> {
    sock.set_read_timeout(Some(read))?;
    sock.set_write_timeout(Some(write))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn settings(e: impl std::fmt::Display) -> ConnError {
    ConnError::Settings(e.to_string())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, ConnError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnError::Settings(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ConnError::Settings("no certificate in cert_pem".into()));
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, ConnError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| ConnError::Settings(format!("private key: {e}")))
}

fn roots(pem: &str) -> Result<RootCertStore, ConnError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(pem)? {
        roots
            .add(cert)
            .map_err(|e| ConnError::Settings(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Drives the handshake to its end, so that its failure has its own message.
fn handshake<S: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<S>,
    sock: &mut UnixStream,
) -> Result<(), ConnError> {
    while conn.is_handshaking() {
        conn.complete_io(sock)
            .map_err(|e| ConnError::Handshake(e.to_string()))?;
    }
    // Our last handshake flight (the client's Finished) may still be buffered.
    while conn.wants_write() {
        conn.write_tls(sock)
            .map_err(|e| ConnError::Handshake(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl Ca {
        fn new() -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let pem = params.self_signed(&key).unwrap().pem();
            Ca {
                issuer: Issuer::new(params, key),
                pem,
            }
        }

        /// A side's settings: a certificate for 10.0.0.2 from this CA, trusting `trusted`.
        fn side(&self, trusted: &Ca, server_name: Option<&str>) -> MigrationTls {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![SanType::IpAddress("10.0.0.2".parse().unwrap())];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            MigrationTls {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                ca_pem: trusted.pem.clone(),
                server_name: server_name.map(str::to_string),
            }
        }
    }

    const T: Duration = Duration::from_secs(10);

    /// Both ends over a socket pair, the destination on its own thread; their outcomes.
    fn connect(
        source: Option<MigrationTls>,
        destination: Option<MigrationTls>,
    ) -> (Result<Conn, ConnError>, Result<Conn, ConnError>) {
        let (a, b) = UnixStream::pair().unwrap();
        let dest = std::thread::spawn(move || {
            let conn = Conn::destination(b, destination.as_ref(), T, T);
            // A refused source hears of it only when it reads: keep reading until it gives up.
            if let Ok(mut c) = conn {
                let mut byte = [0u8; 5];
                return c
                    .read_exact(&mut byte)
                    .map(|()| c)
                    .map_err(|e| ConnError::Handshake(e.to_string()));
            }
            conn
        });
        let src = Conn::source(a, source.as_ref(), T, T).and_then(|mut c| {
            c.write_all(b"hello").and_then(|()| c.flush())?;
            Ok(c)
        });
        (src, dest.join().unwrap())
    }

    #[test]
    fn peers_of_one_ca_talk_and_the_bytes_arrive() {
        let ca = Ca::new();
        let (src, dst) = connect(Some(ca.side(&ca, Some("10.0.0.2"))), Some(ca.side(&ca, None)));
        let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
        dst.write_all(b"ack").unwrap();
        dst.flush().unwrap();
        let mut back = [0u8; 3];
        src.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ack");
        // Plain on both sides works too (a socket pair on one host).
        let (src, dst) = connect(None, None);
        assert!(src.is_ok() && dst.is_ok());
    }

    #[test]
    fn a_source_certificate_from_another_ca_is_refused() {
        let (ca, other) = (Ca::new(), Ca::new());
        let (_, dst) = connect(Some(other.side(&ca, Some("10.0.0.2"))), Some(ca.side(&ca, None)));
        let e = dst.err().expect("the destination refuses");
        assert!(matches!(e, ConnError::Handshake(_)), "{e}");
    }

    #[test]
    fn the_source_checks_the_destination_certificate_and_name() {
        let (ca, other) = (Ca::new(), Ca::new());
        let (src, _) = connect(Some(ca.side(&ca, Some("10.0.0.2"))), Some(other.side(&ca, None)));
        let e = src.err().expect("another CA's destination is refused");
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
        let (src, _) = connect(Some(ca.side(&ca, Some("10.0.0.9"))), Some(ca.side(&ca, None)));
        let e = src.err().expect("a destination with another name is refused");
        assert!(e.to_string().contains("certificate"), "{e}");
        // A plain source meets a TLS destination: the destination sees no TLS.
        let (_, dst) = connect(None, Some(ca.side(&ca, None)));
        assert!(dst.is_err());
    }

    #[test]
    fn unusable_settings_are_clear_errors() {
        let ca = Ca::new();
        let (a, _b) = UnixStream::pair().unwrap();
        let e = Conn::source(a, Some(&ca.side(&ca, None)), T, T).err().unwrap();
        assert!(e.to_string().contains("server_name"), "{e}");
        let mut broken = ca.side(&ca, Some("10.0.0.2"));
        broken.key_pem = "not a key".into();
        let (a, _b) = UnixStream::pair().unwrap();
        let e = Conn::source(a, Some(&broken), T, T).err().unwrap();
        assert!(matches!(e, ConnError::Settings(_)), "{e}");
        let mut no_ca = ca.side(&ca, None);
        no_ca.ca_pem = String::new();
        let (_a, b) = UnixStream::pair().unwrap();
        let e = Conn::destination(b, Some(&no_ca), T, T).err().unwrap();
        assert!(e.to_string().contains("no certificate"), "{e}");
    }
}
