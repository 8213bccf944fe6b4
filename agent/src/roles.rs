//! Roles of TCP clients, from their (mutual-TLS verified) client certificates, and the layer that
//! checks every call against the role it needs.
//!
//! A client certificate names its role in a subject alternative name URI
//! `vmmagent-role:viewer|operator|admin` (the highest one counts if it names several). Viewers may
//! read (get, list, watch, console, host, operations get/list/wait, images, health, reflection);
//! operators also drive VMs (create, start, stop, pause, resume, reboot, cancel operations) and
//! register or upload images; admins may do everything, including delete. A method this table does not know needs admin, so that a new RPC
//! is closed until someone decides who may call it. The Unix socket has no such layer: its file
//! mode decides who connects, and whoever does is admin.
//!
//! Apart from that ladder, `vmmagent-role:migration-peer` marks another host's agent: it may call
//! `MigrationPeerService` (prepare this host to receive a VM) and nothing else, and nothing else
//! may call that service, admins included.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

use crate::error::AgentError;

/// The URI scheme of a role in a certificate's subject alternative names.
pub const ROLE_URI_PREFIX: &str = "vmmagent-role:";
/// The role name of a peer agent.
pub const MIGRATION_PEER: &str = "migration-peer";
/// The service only peer agents may call.
const PEER_SERVICE: &str = "vmmagent.v1.MigrationPeerService";

/// What a client certificate grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grants {
    /// Its place on the viewer/operator/admin ladder, if any.
    pub role: Option<Role>,
    /// It is another host's agent.
    pub migration_peer: bool,
}

impl Grants {
    /// A client with `role` only.
    pub fn role(role: Role) -> Self {
        Grants {
            role: Some(role),
            migration_peer: false,
        }
    }
}

/// What a client may do, each role including the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read-only calls.
    Viewer,
    /// Reads and VM lifecycle.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// The role's name, as in certificates.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    fn from_name(name: &str) -> Option<Role> {
        match name {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The role a gRPC method (`/package.Service/Method`) needs.
pub fn required_role(path: &str) -> Role {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Role::Admin;
    };
    match (service, method) {
        ("grpc.health.v1.Health", _) | ("grpc.reflection.v1.ServerReflection", _) => Role::Viewer,
        ("vmmagent.v1.VmService", "GetVm" | "ListVms" | "WatchVms" | "GetConsole" | "GetBalloon") => {
            Role::Viewer
        }
        ("vmmagent.v1.HostService", "GetHost") => Role::Viewer,
        ("vmmagent.v1.SnapshotService", "GetSnapshot" | "ListSnapshots") => Role::Viewer,
        // Restoring creates a VM, like CreateVm; deleting a snapshot, like deleting a VM, is admin.
        ("vmmagent.v1.SnapshotService", "CreateSnapshot" | "RestoreSnapshot") => Role::Operator,
        ("vmmagent.v1.OperationsService", "GetOperation" | "ListOperations" | "WaitOperation") => {
            Role::Viewer
        }
        (
            "vmmagent.v1.VmService",
            "CreateVm" | "StartVm" | "StopVm" | "PauseVm" | "ResumeVm" | "RebootVm" | "StopVmAsync"
            | "RebootVmAsync" | "UpdateVm",
        ) => Role::Operator,
        ("vmmagent.v1.OperationsService", "CancelOperation") => Role::Operator,
        ("vmmagent.v1.ImageService", "GetImage" | "ListImages") => Role::Viewer,
        // Images are made like VMs; deleting one, like deleting a VM or a snapshot, is admin.
        ("vmmagent.v1.ImageService", "RegisterImage" | "UploadImage") => Role::Operator,
        ("vmmagent.v1.MigrationService", "WatchMigration") => Role::Viewer,
        ("vmmagent.v1.MigrationService", "MigrateVm" | "CancelMigration") => Role::Operator,
        _ => Role::Admin,
    }
}

/// One DER element: its tag, its contents and what follows it. `None` for anything malformed
/// or not needed here (high tag numbers, indefinite lengths, lengths past the input).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, b| (l << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The elements of a constructed DER value, in order (stopping at the first malformed one).
fn children(mut content: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, value, rest) = der(content)?;
        content = rest;
        Some((tag, value))
    })
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
/// `[3] EXPLICIT Extensions` in a TBSCertificate.
const EXTENSIONS: u8 = 0xa3;
/// `uniformResourceIdentifier [6] IMPLICIT IA5String` in a GeneralName.
const URI_NAME: u8 = 0x86;
/// 2.5.29.17, subjectAltName.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// The URIs among a DER certificate's subject alternative names.
pub fn san_uris(cert: &[u8]) -> Vec<String> {
    let mut uris = Vec::new();
    let Some((SEQUENCE, certificate, _)) = der(cert) else {
        return uris;
    };
    let Some((SEQUENCE, tbs, _)) = der(certificate) else {
        return uris;
    };
    for (tag, value) in children(tbs) {
        if tag != EXTENSIONS {
            continue;
        }
        let Some((SEQUENCE, extensions, _)) = der(value) else {
            continue;
        };
        for (tag, extension) in children(extensions) {
            if tag != SEQUENCE {
                continue;
            }
            let mut parts = children(extension);
            if parts.next() != Some((OID, SUBJECT_ALT_NAME)) {
                continue;
            }
            // An optional `critical` BOOLEAN comes before the value.
            let Some((_, names)) = parts.find(|(tag, _)| *tag == OCTET_STRING) else {
                continue;
            };
            let Some((SEQUENCE, names, _)) = der(names) else {
                continue;
            };
            for (tag, name) in children(names) {
                if tag == URI_NAME {
                    if let Ok(uri) = std::str::from_utf8(name) {
                        uris.push(uri.to_string());
                    }
                }
            }
        }
    }
    uris
}

/// The role a DER client certificate grants, if any.
pub fn certificate_role(cert: &[u8]) -> Option<Role> {
    certificate_grants(cert).role
}

/// What a DER client certificate grants.
pub fn certificate_grants(cert: &[u8]) -> Grants {
    let uris = san_uris(cert);
    let names = || uris.iter().filter_map(|uri| uri.strip_prefix(ROLE_URI_PREFIX));
    Grants {
        role: names().filter_map(Role::from_name).max(),
        migration_peer: names().any(|n| n == MIGRATION_PEER),
    }
}

/// Checks that a client with `grants` may call `path`.
pub fn authorize(grants: &Grants, path: &str) -> Result<(), AgentError> {
    let service = path.trim_start_matches('/').split_once('/').map(|(s, _)| s);
    if service == Some(PEER_SERVICE) || grants.role.is_none() && grants.migration_peer {
        return match (service == Some(PEER_SERVICE), grants.migration_peer) {
            (true, true) => Ok(()),
            (true, false) => Err(AgentError::PermissionDenied(format!(
                "{path} is for peer agents: it needs a certificate naming {ROLE_URI_PREFIX}{MIGRATION_PEER}"
            ))),
            _ => Err(AgentError::PermissionDenied(format!(
                "{path}: a {MIGRATION_PEER} certificate may only call {PEER_SERVICE}"
            ))),
        };
    }
    let needed = required_role(path);
    match grants.role {
        Some(r) if r >= needed => Ok(()),
        Some(r) => Err(AgentError::PermissionDenied(format!(
            "{path} needs the {} role; the client certificate grants {}",
            needed.name(),
            r.name()
        ))),
        None => Err(AgentError::PermissionDenied(format!(
            "{path} needs the {} role; the client certificate names no role \
             (a subject alternative name URI {ROLE_URI_PREFIX}viewer|operator|admin)",
            needed.name()
        ))),
    }
}

/// Adds the role check to a TLS server's services.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoleLayer;

impl<S> tower::Layer<S> for RoleLayer {
    type Service = RoleCheck<S>;

    fn layer(&self, inner: S) -> RoleCheck<S> {
        RoleCheck { inner }
    }
}

/// A service that answers PERMISSION_DENIED for calls the client's role does not allow.
#[derive(Debug, Clone)]
pub struct RoleCheck<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RoleCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // rustls has verified the chain against the client CA before any request arrives; only
        // the leaf names the role.
        let grants = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().map(|c| certificate_grants(c.as_ref())))
            .unwrap_or_default();
        match authorize(&grants, request.uri().path()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(e) => {
                tracing::info!(error = %e, "call refused");
                let response = Status::from(e).into_http::<R>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_need_the_right_roles() {
        assert_eq!(required_role("/vmmagent.v1.VmService/ListVms"), Role::Viewer);
        assert_eq!(required_role("/vmmagent.v1.VmService/StopVm"), Role::Operator);
        assert_eq!(required_role("/vmmagent.v1.VmService/DeleteVm"), Role::Admin);
        assert_eq!(
            required_role("/vmmagent.v1.SnapshotService/ListSnapshots"),
            Role::Viewer
        );
        assert_eq!(
            required_role("/vmmagent.v1.SnapshotService/RestoreSnapshot"),
            Role::Operator
        );
        assert_eq!(
            required_role("/vmmagent.v1.SnapshotService/DeleteSnapshot"),
            Role::Admin
        );
        assert_eq!(
            required_role("/vmmagent.v1.OperationsService/WaitOperation"),
            Role::Viewer
        );
        assert_eq!(
            required_role("/vmmagent.v1.OperationsService/CancelOperation"),
            Role::Operator
        );
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), Role::Viewer);
        for (method, role) in [
            ("GetImage", Role::Viewer),
            ("ListImages", Role::Viewer),
            ("RegisterImage", Role::Operator),
            ("UploadImage", Role::Operator),
            ("DeleteImage", Role::Admin),
        ] {
            assert_eq!(
                required_role(&format!("/vmmagent.v1.ImageService/{method}")),
                role,
                "{method}"
            );
        }
        // Unknown methods are closed to all but admins.
        assert_eq!(required_role("/vmmagent.v1.VmService/Nuke"), Role::Admin);
        assert_eq!(required_role("garbage"), Role::Admin);
        let e = authorize(&Grants::role(Role::Viewer), "/vmmagent.v1.VmService/StopVm").unwrap_err();
        assert!(e.to_string().contains("needs the operator role"), "{e}");
        assert!(authorize(&Grants::role(Role::Admin), "/vmmagent.v1.VmService/DeleteVm").is_ok());
        assert!(authorize(&Grants::default(), "/vmmagent.v1.VmService/ListVms").is_err());
        assert_eq!(
            required_role("/vmmagent.v1.MigrationService/MigrateVm"),
            Role::Operator
        );
    }

    #[test]
    fn only_peer_agents_prepare_incoming_migrations_and_peers_do_nothing_else() {
        let prepare = "/vmmagent.v1.MigrationPeerService/PrepareIncoming";
        let peer = Grants {
            role: None,
            migration_peer: true,
        };
        assert!(authorize(&peer, prepare).is_ok());
        for denied in [
            "/vmmagent.v1.VmService/ListVms",
            "/vmmagent.v1.MigrationService/MigrateVm",
        ] {
            let e = authorize(&peer, denied).unwrap_err();
            assert!(e.to_string().contains("may only call"), "{e}");
        }
        let e = authorize(&Grants::role(Role::Admin), prepare).unwrap_err();
        assert!(e.to_string().contains("vmmagent-role:migration-peer"), "{e}");
        // A peer that is also an operator keeps both.
        let both = Grants {
            role: Some(Role::Operator),
            migration_peer: true,
        };
        assert!(authorize(&both, prepare).is_ok());
        assert!(authorize(&both, "/vmmagent.v1.VmService/StopVm").is_ok());
    }

    fn cert_with(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn roles_come_from_san_uris() {
        let cert = cert_with(vec![
            rcgen::SanType::DnsName("client.example".try_into().unwrap()),
            uri("spiffe://example/agent"),
            uri("vmmagent-role:operator"),
        ]);
        assert_eq!(
            san_uris(&cert),
            ["spiffe://example/agent", "vmmagent-role:operator"]
        );
        assert_eq!(certificate_role(&cert), Some(Role::Operator));
        let both = cert_with(vec![uri("vmmagent-role:viewer"), uri("vmmagent-role:admin")]);
        assert_eq!(certificate_role(&both), Some(Role::Admin));
        let peer = cert_with(vec![uri("vmmagent-role:migration-peer")]);
        assert_eq!(
            certificate_grants(&peer),
            Grants {
                role: None,
                migration_peer: true
            }
        );
        assert_eq!(
            certificate_role(&cert_with(vec![uri("vmmagent-role:root")])),
            None
        );
        assert_eq!(certificate_role(&cert_with(Vec::new())), None);
    }

    #[test]
    fn malformed_certificates_grant_nothing() {
        let cert = cert_with(vec![uri("vmmagent-role:admin")]);
        for cut in [0, 1, 2, 10, cert.len() / 2, cert.len() - 1] {
            // Truncated: the outer length runs past the input.
            assert_eq!(certificate_role(&cert[..cut]), None, "cut at {cut}");
        }
        assert_eq!(certificate_role(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(certificate_role(b"not a certificate"), None);
    }
}
