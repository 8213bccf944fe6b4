//! A real guest through the whole lifecycle, over real gRPC on a Unix socket and on TCP with
//! mutual TLS: create -> running (BOOT-COMPLETE through GetConsole) -> pause -> resume -> stop ->
//! start -> delete, with the changes seen by WatchVms in revision order, and no process or file
//! left behind. One guest per transport, both at once.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{
    alive, probe_spec, state_dir, vmm_processes_under, wait_console, Agent, TlsAgent, BOOT_TIMEOUT,
};
use tonic::transport::Channel;
use tonic::Code;
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{
    CreateVmRequest, DeleteVmRequest, GetVmRequest, PauseVmRequest, ResumeVmRequest, StartVmRequest,
    StopVmRequest, VmState, WatchEventType, WatchVmsEvent, WatchVmsRequest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_pause_resume_stop_start_delete_over_a_unix_socket() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-life")?;
    let agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    lifecycle(agent.vms().await?, dir.path(), "life").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_pause_resume_stop_start_delete_over_tls_tcp() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-life-tls")?;
    let tls = TlsAgent::start(dir.path())?;
    tls.agent.wait_serving().await?;
    // Deleting takes the admin role.
    lifecycle(tls.vms("admin").await?, dir.path(), "life-tls").await
}

/// The whole lifecycle of VM `id` through `vms`, an agent's VmService whose state directory is
/// `dir`.
async fn lifecycle(mut vms: VmServiceClient<Channel>, dir: &std::path::Path, id: &str) -> Result<()> {
    let mut watch = vms
        .watch_vms(WatchVmsRequest { from_revision: 0 })
        .await?
        .into_inner();
    let synced = watch.message().await?.expect("a SYNCED event");
    assert_eq!(synced.r#type(), WatchEventType::Synced);
    assert_eq!(synced.revision, 0);

    let id = id.to_string();
    let create = CreateVmRequest {
        vm_id: id.clone(),
        spec: Some(probe_spec("idle")?),
        request_id: format!("create-{id}-1"),
    };
    let vm = vms.create_vm(create.clone()).await?.into_inner();
    assert_eq!(vm.state(), VmState::Running, "{vm:?}");
    let pid = vm.pid;
    assert!(alive(pid));
    // A retry with the same request id answers the first result and starts nothing.
    let retry = vms.create_vm(create.clone()).await?.into_inner();
    assert_eq!(retry, vm);
    assert_eq!(vmm_processes_under(dir), vec![pid]);
    // The same id without that request id, or with another spec, is ALREADY_EXISTS; the request
    // id with a different request is INVALID_ARGUMENT.
    let mut other = create.clone();
    other.request_id = String::new();
    let err = vms.create_vm(other.clone()).await.expect_err("refused");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    other.request_id = format!("create-{id}-2");
    if let Some(s) = other.spec.as_mut() {
        s.vcpus = 2;
    }
    let err = vms.create_vm(other.clone()).await.expect_err("refused");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    other.request_id = create.request_id.clone();
    let err = vms.create_vm(other).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("request_id"), "{}", err.message());
    assert_eq!(vmm_processes_under(dir), vec![pid]);
    let console = wait_console(&mut vms, &id, "BOOT-COMPLETE", BOOT_TIMEOUT).await?;
    assert!(console.contains("vmmprobe"), "{console}");

    let paused = vms
        .pause_vm(PauseVmRequest {
            vm_id: id.clone(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(paused.state(), VmState::Paused);
    // Pausing a paused VM changes nothing and is no error.
    let again = vms
        .pause_vm(PauseVmRequest {
            vm_id: id.clone(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(
        (again.state(), again.revision),
        (VmState::Paused, paused.revision)
    );
    let resumed = vms
        .resume_vm(ResumeVmRequest {
            vm_id: id.clone(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!((resumed.state(), resumed.pid), (VmState::Running, pid));

    // Graceful stop: the guest kernel restarts on Ctrl-Alt-Del, so the vmm exits 0 quickly.
    let stopped = vms
        .stop_vm(StopVmRequest {
            vm_id: id.clone(),
            request_id: String::new(),
            timeout_ms: 20_000,
            force: false,
        })
        .await?
        .into_inner();
    assert_eq!(stopped.state(), VmState::Stopped, "{stopped:?}");
    assert_eq!((stopped.pid, stopped.exit_code), (0, Some(0)));
    assert!(!alive(pid), "the vmm is gone");
    for code in [
        vms.pause_vm(PauseVmRequest {
            vm_id: id.clone(),
            request_id: String::new(),
        })
        .await
        .map(|_| ())
        .expect_err("refused")
        .code(),
        vms.resume_vm(ResumeVmRequest {
            vm_id: id.clone(),
            request_id: String::new(),
        })
        .await
        .map(|_| ())
        .expect_err("refused")
        .code(),
    ] {
        assert_eq!(code, Code::FailedPrecondition);
    }

    let started = vms
        .start_vm(StartVmRequest {
            vm_id: id.clone(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(started.state(), VmState::Running, "{started:?}");
    assert_ne!(started.pid, pid, "a new vmm process");
    assert!(started.boot_ms.is_none(), "boot time is per run");

    let new_pid = started.pid;
    vms.delete_vm(DeleteVmRequest {
        vm_id: id.clone(),
        request_id: String::new(),
    })
    .await?;
    assert!(!alive(new_pid));
    let gone = vms
        .get_vm(GetVmRequest { vm_id: id.clone() })
        .await
        .expect_err("refused");
    assert_eq!(gone.code(), Code::NotFound);
    assert!(vmm_processes_under(dir).is_empty());
    assert!(!dir.join("vms").join(&id).exists(), "the VM's files are removed");

    // The watch saw every change, in order, ending with the deletion.
    let mut events: Vec<WatchVmsEvent> = Vec::new();
    while events.last().map(|e| e.r#type()) != Some(WatchEventType::Deleted) {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await??
            .expect("more events");
        events.push(event);
    }
    for pair in events.windows(2) {
        assert_eq!(pair[1].revision, pair[0].revision + 1, "{events:?}");
    }
    let states: Vec<VmState> = events
        .iter()
        .filter_map(|e| e.vm.as_ref().map(|v| v.state()))
        .collect();
    let mut dedup = states.clone();
    dedup.dedup();
    let expected_order = [
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
    ];
    let mut it = dedup.iter();
    for want in expected_order {
        assert!(it.any(|s| *s == want), "{want:?} missing in order from {dedup:?}");
    }
    assert_eq!(events[0].r#type(), WatchEventType::Created);

    // A watch resumed from the middle replays exactly what followed.
    let middle = events[events.len() / 2].revision;
    let mut resumed = vms
        .watch_vms(WatchVmsRequest {
            from_revision: middle,
        })
        .await?
        .into_inner();
    let first = resumed.message().await?.expect("an event");
    assert_eq!(first.revision, middle + 1);
    Ok(())
}
