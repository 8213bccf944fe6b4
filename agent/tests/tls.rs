//! TCP with mutual TLS and client-certificate roles, over real gRPC to a real agent, with a PKI
//! made here with rcgen: a viewer can list but not stop, an operator can stop but not delete, an
//! admin can delete, a certificate without a role gets nothing; a client certificate from another
//! CA, a TLS client without a certificate and a plain-TCP client are refused at the connection;
//! the agent refuses to listen on TCP without TLS (unless --insecure-tcp, on loopback only); and
//! vmmctl speaks TLS with --tls-ca/--tls-cert/--tls-key.

mod common;

use std::process::Command;

use anyhow::{bail, Result};
use common::{state_dir, write, Agent, Ca, TlsAgent};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vmm_agent::client::{connect, ClientTls};
use vmm_agent::proto::image_service_client::ImageServiceClient;
use vmm_agent::proto::operations_service_client::OperationsServiceClient;
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{
    DeleteImageRequest, DeleteVmRequest, ListImagesRequest, ListOperationsRequest, ListVmsRequest,
    RegisterImageRequest, StopVmRequest,
};

/// A port that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Lists VMs through `endpoint` with `tls`; the error as text if the connection or call fails.
async fn try_list(endpoint: &str, tls: Option<ClientTls>) -> Result<usize, String> {
    let channel = connect(endpoint, tls)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut vms = VmServiceClient::new(channel);
    vms.list_vms(ListVmsRequest::default())
        .await
        .map(|r| r.into_inner().vms.len())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_roles_and_refusals() -> Result<()> {
    let dir = state_dir("agent-tls")?;
    let TlsAgent { agent, endpoint, ca } = TlsAgent::start(dir.path())?;
    let (cert, ca_file) = (dir.path().join("server.pem"), dir.path().join("ca.pem"));
    agent.wait_serving().await?;
    let with_ca = |mut tls: ClientTls| {
        tls.ca = ca.pem.clone().into_bytes();
        Some(tls)
    };
    let viewer = with_ca(ca.client(Some("viewer"))?);
    let operator = with_ca(ca.client(Some("operator"))?);
    let admin = with_ca(ca.client(Some("admin"))?);
    let nobody = with_ca(ca.client(None)?);

    // A viewer reads: VMs, operations, health.
    assert_eq!(try_list(&endpoint, viewer.clone()).await, Ok(0));
    let channel = connect(&endpoint, viewer.clone()).await?;
    OperationsServiceClient::new(channel.clone())
        .list_operations(ListOperationsRequest::default())
        .await?;
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await?;
    // ... but does not stop: PERMISSION_DENIED naming the role needed, before the VM is looked up.
    let stop = StopVmRequest {
        vm_id: "nosuch".into(),
        request_id: String::new(),
        timeout_ms: 0,
        force: true,
    };
    let delete = DeleteVmRequest {
        vm_id: "nosuch".into(),
        request_id: String::new(),
    };
    let err = VmServiceClient::new(channel.clone())
        .stop_vm(stop.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("needs the operator role"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("grants viewer"), "{}", err.message());
    // An operator gets past the check (so the VM is not found) but does not delete.
    let mut as_operator = VmServiceClient::new(connect(&endpoint, operator.clone()).await?);
    let err = as_operator.stop_vm(stop.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = as_operator.delete_vm(delete.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("needs the admin role"),
        "{}",
        err.message()
    );
    let err = VmServiceClient::new(connect(&endpoint, admin.clone()).await?)
        .delete_vm(delete.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Images: viewers list, operators register (here refused for its input, so past the role
    // check), only admins delete.
    let mut as_viewer = ImageServiceClient::new(channel.clone());
    as_viewer.list_images(ListImagesRequest::default()).await?;
    let register = RegisterImageRequest {
        image_id: "img".into(),
        kernel: "relative".into(),
        ..Default::default()
    };
    let err = as_viewer.register_image(register.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut images_as_operator = ImageServiceClient::new(connect(&endpoint, operator.clone()).await?);
    let err = images_as_operator.register_image(register).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let delete_image = DeleteImageRequest {
        image_id: "img".into(),
        request_id: String::new(),
    };
    let err = images_as_operator
        .delete_image(delete_image.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = ImageServiceClient::new(connect(&endpoint, admin.clone()).await?)
        .delete_image(delete_image)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A certificate of the right CA that names no role may do nothing.
    let refused = try_list(&endpoint, nobody).await.unwrap_err();
    assert!(refused.starts_with("PermissionDenied"), "{refused}");
    assert!(refused.contains("names no role"), "{refused}");

    // Refused at the connection: an admin certificate from another CA, a TLS client without a
    // certificate, plain TCP. (Were any of them let in, the listing would succeed.)
    let other = Ca::new("another CA")?;
    let mut foreign = other.client(Some("admin"))?;
    foreign.ca = ca.pem.clone().into_bytes();
    let refused = try_list(&endpoint, Some(foreign)).await.unwrap_err();
    assert!(!refused.starts_with("PermissionDenied"), "{refused}");
    let anonymous = ClientTls {
        ca: ca.pem.clone().into_bytes(),
        identity: None,
    };
    try_list(&endpoint, Some(anonymous)).await.unwrap_err();
    try_list(&endpoint, None).await.unwrap_err();
    // The Unix socket next to it needs no certificate: its file mode decides.
    let mut local = agent.vms().await?;
    let err = local.delete_vm(delete).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // vmmctl over TLS: the viewer lists, and is refused a delete with the code shown.
    let vmmctl = |tls: &ClientTls, args: &[&str]| -> Result<std::process::Output> {
        let (c, k) = tls.identity.clone().unwrap_or_default();
        let cert = write(dir.path(), "vmmctl.pem", &String::from_utf8(c)?)?;
        let key = write(dir.path(), "vmmctl.key", &String::from_utf8(k)?)?;
        Ok(Command::new(env!("CARGO_BIN_EXE_vmmctl"))
            .args(["--endpoint", &endpoint, "--tls-ca"])
            .arg(&ca_file)
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .args(args)
            .output()?)
    };
    let viewer_tls = viewer.clone().unwrap_or_default();
    let out = vmmctl(&viewer_tls, &["list"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ID"));
    let out = vmmctl(&viewer_tls, &["delete", "nosuch"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    drop(agent);

    // No TLS on TCP, no agent; --insecure-tcp only on loopback, and then plain clients work.
    let refuse = |args: &[&str], why: &str| -> Result<()> {
        let out = Command::new(env!("CARGO_BIN_EXE_vmm-agent"))
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--vmm-bin")
            .arg(harness::vmm_binary())
            .args(args)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains(why) {
            bail!("vmm-agent {args:?} should fail with '{why}': {stderr}");
        }
        Ok(())
    };
    refuse(&["--listen", &endpoint], "needs mutual TLS")?;
    refuse(
        &["--listen", "tcp://0.0.0.0:1", "--insecure-tcp"],
        "only loopback",
    )?;
    refuse(
        &["--listen", &endpoint, "--tls-cert", &cert.display().to_string()],
        "go together",
    )?;
    let port = free_port()?;
    let insecure = format!("tcp://127.0.0.1:{port}");
    let agent = Agent::start(dir.path(), &["--listen", &insecure, "--insecure-tcp"])?;
    agent.wait_serving().await?;
    assert_eq!(try_list(&insecure, None).await, Ok(0));
    Ok(())
}
