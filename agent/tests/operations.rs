//! Long-running operations over real gRPC on a Unix socket: StopVmAsync/RebootVmAsync return an
//! Operation at once; errors that are known at once are statuses, others the operation's outcome;
//! WaitOperation with a timeout; an agent SIGKILLed while a stop waits for a guest that ignores
//! Ctrl-Alt-Del finds that operation ABORTED after its restart and keeps the finished ones;
//! CancelOperation cuts a graceful stop short; ListOperations filters and pages.

mod common;

use std::time::Duration;

use anyhow::{bail, Result};
use common::{alive, probe_spec, state_dir, wait_console, wait_state, Agent, BOOT_TIMEOUT};
use tonic::transport::Channel;
use tonic::Code;
use vmm_agent::proto::operations_service_client::OperationsServiceClient;
use vmm_agent::proto::{
    operation, operation_response, CancelOperationRequest, CreateVmRequest, DeleteVmRequest,
    GetOperationRequest, GetVmRequest, ListOperationsRequest, Operation, OperationError, OperationKind,
    RebootVmRequest, StopVmRequest, Vm, VmSpec, VmState, WaitOperationRequest,
};

fn error_of(op: &Operation) -> Option<&OperationError> {
    match &op.result {
        Some(operation::Result::Error(e)) => Some(e),
        _ => None,
    }
}

fn vm_of(op: &Operation) -> Option<&Vm> {
    match &op.result {
        Some(operation::Result::Response(r)) => match &r.value {
            Some(operation_response::Value::Vm(vm)) => Some(vm),
            _ => None,
        },
        _ => None,
    }
}

fn stop(vm_id: &str, request_id: &str, timeout_ms: u64) -> StopVmRequest {
    StopVmRequest {
        vm_id: vm_id.into(),
        request_id: request_id.into(),
        timeout_ms,
        force: false,
    }
}

async fn wait_done(ops: &mut OperationsServiceClient<Channel>, name: &str) -> Result<Operation> {
    let op = ops
        .wait_operation(WaitOperationRequest {
            name: name.into(),
            timeout_ms: 120_000,
        })
        .await?
        .into_inner();
    if !op.done {
        bail!("{name} is not done after the wait: {op:?}");
    }
    Ok(op)
}

async fn list(
    ops: &mut OperationsServiceClient<Channel>,
    request: ListOperationsRequest,
) -> Result<(Vec<String>, String)> {
    let r = ops.list_operations(request).await?.into_inner();
    Ok((
        r.operations.into_iter().map(|o| o.name).collect(),
        r.next_page_token,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_operations_abort_on_agent_crash_and_cancel() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-ops")?;
    let mut agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let mut ops = OperationsServiceClient::new(agent.channel().await?);

    // Known at once: statuses, and no operation is started.
    let err = vms.stop_vm_async(stop("nosuch", "", 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = vms
        .stop_vm_async(stop("nosuch", "", 10_000_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("timeout_ms"), "{}", err.message());
    for (name, code) in [
        ("", Code::InvalidArgument),
        ("vms/x", Code::InvalidArgument),
        ("operations/0-0", Code::NotFound),
    ] {
        let err = ops
            .get_operation(GetOperationRequest { name: name.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{name}: {err:?}");
    }
    let err = ops
        .wait_operation(WaitOperationRequest {
            name: "operations/0-0".into(),
            timeout_ms: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(list(&mut ops, ListOperationsRequest::default())
        .await?
        .0
        .is_empty());

    // Known only by the VM's actor: the operation's outcome. A kernel that is no kernel: the vmm
    // ends at once and the VM is FAILED, so it cannot be rebooted, but stopping it is a no-op.
    let junk = VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: "/etc/hostname".into(),
        ..Default::default()
    };
    vms.create_vm(CreateVmRequest {
        vm_id: "junk".into(),
        spec: Some(junk),
        request_id: String::new(),
    })
    .await?;
    wait_state(&mut vms, "junk", VmState::Failed, Duration::from_secs(30)).await?;
    let reboot = vms
        .reboot_vm_async(RebootVmRequest {
            vm_id: "junk".into(),
            request_id: String::new(),
            timeout_ms: 0,
        })
        .await?
        .into_inner();
    let meta = reboot.metadata.clone().unwrap_or_default();
    assert_eq!(
        (meta.kind(), meta.vm_id.as_str()),
        (OperationKind::RebootVm, "junk")
    );
    let reboot = wait_done(&mut ops, &reboot.name).await?;
    let e = error_of(&reboot).expect("an error");
    assert_eq!(e.code, Code::FailedPrecondition as i32, "{e:?}");
    assert!(e.message.contains("cannot be rebooted"), "{}", e.message);
    let junk_stop = vms.stop_vm_async(stop("junk", "", 0)).await?.into_inner();
    let junk_stop = wait_done(&mut ops, &junk_stop.name).await?;
    assert_eq!(
        vm_of(&junk_stop).map(|v| v.state()),
        Some(VmState::Failed),
        "{junk_stop:?}"
    );

    // A guest that ignores Ctrl-Alt-Del: a graceful stop waits out its whole timeout.
    let mut spec = probe_spec("idle")?;
    spec.cmdline.push_str(" vmmprobe.cad=ignore");
    let vm = vms
        .create_vm(CreateVmRequest {
            vm_id: "slow".into(),
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(vm.state(), VmState::Running, "{vm:?}");
    let pid = vm.pid;
    wait_console(&mut vms, "slow", "BOOT-COMPLETE", BOOT_TIMEOUT).await?;
    let first = vms
        .stop_vm_async(stop("slow", "stop-slow-1", 600_000))
        .await?
        .into_inner();
    assert!(!first.done, "{first:?}");
    assert!(first.name.starts_with("operations/"), "{}", first.name);
    // A retry returns the same operation and starts no other.
    let retry = vms
        .stop_vm_async(stop("slow", "stop-slow-1", 600_000))
        .await?
        .into_inner();
    assert_eq!(retry.name, first.name);
    // The guest got the request and ignored it; a short wait returns the operation unfinished.
    wait_console(&mut vms, "slow", "ctrl-alt-del ignored", Duration::from_secs(120)).await?;
    let waited = ops
        .wait_operation(WaitOperationRequest {
            name: first.name.clone(),
            timeout_ms: 100,
        })
        .await?
        .into_inner();
    assert!(!waited.done, "{waited:?}");
    let (running, _) = list(
        &mut ops,
        ListOperationsRequest {
            vm_id: "slow".into(),
            done: Some(false),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(running, std::slice::from_ref(&first.name));

    // The agent dies while the stop waits; the VM runs on, and the new agent reports the stop
    // ABORTED, as the retry of its request id does.
    agent.kill9();
    assert!(alive(pid));
    agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let mut ops = OperationsServiceClient::new(agent.channel().await?);
    let aborted = ops
        .get_operation(GetOperationRequest {
            name: first.name.clone(),
        })
        .await?
        .into_inner();
    assert!(aborted.done, "{aborted:?}");
    let e = error_of(&aborted).expect("an error");
    assert_eq!(e.code, Code::Aborted as i32, "{e:?}");
    assert!(e.message.contains("agent stopped"), "{}", e.message);
    let replay = vms
        .stop_vm_async(stop("slow", "stop-slow-1", 600_000))
        .await?
        .into_inner();
    assert_eq!(replay, aborted);
    // What had finished is kept as it was.
    let kept = ops
        .get_operation(GetOperationRequest {
            name: reboot.name.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(kept, reboot);
    let slow = vms
        .get_vm(GetVmRequest { vm_id: "slow".into() })
        .await?
        .into_inner();
    assert_eq!(slow.pid, pid, "re-adopted: {slow:?}");

    // Cancelling a graceful stop stops the VM hard at once; the outcome is CANCELLED.
    let second = vms
        .stop_vm_async(stop("slow", "stop-slow-2", 600_000))
        .await?
        .into_inner();
    wait_state(&mut vms, "slow", VmState::Stopping, Duration::from_secs(30)).await?;
    let cancelling = ops
        .cancel_operation(CancelOperationRequest {
            name: second.name.clone(),
        })
        .await?
        .into_inner();
    assert!(
        cancelling.metadata.as_ref().is_some_and(|m| m.cancel_requested),
        "{cancelling:?}"
    );
    let cancelled = wait_done(&mut ops, &second.name).await?;
    let e = error_of(&cancelled).expect("an error");
    assert_eq!(e.code, Code::Cancelled as i32, "{e:?}");
    assert!(e.message.contains("stopped hard"), "{}", e.message);
    let slow = wait_state(&mut vms, "slow", VmState::Stopped, Duration::from_secs(30)).await?;
    assert_eq!(slow.pid, 0);
    assert!(!alive(pid), "the vmm is gone");
    // Cancelling it again changes nothing.
    let again = ops
        .cancel_operation(CancelOperationRequest {
            name: second.name.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(again, cancelled);

    // Newest first, in pages, with filters.
    let all = [
        second.name.clone(),
        first.name.clone(),
        junk_stop.name.clone(),
        reboot.name.clone(),
    ];
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = list(
            &mut ops,
            ListOperationsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await?;
        assert!(page.len() <= 3);
        seen.extend(page);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(seen, all);
    let (reboots, _) = list(
        &mut ops,
        ListOperationsRequest {
            kind: OperationKind::RebootVm as i32,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(reboots, std::slice::from_ref(&reboot.name));
    let (running, _) = list(
        &mut ops,
        ListOperationsRequest {
            done: Some(false),
            ..Default::default()
        },
    )
    .await?;
    assert!(running.is_empty(), "{running:?}");
    let err = ops
        .list_operations(ListOperationsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    for id in ["slow", "junk"] {
        vms.delete_vm(DeleteVmRequest {
            vm_id: id.into(),
            request_id: String::new(),
        })
        .await?;
    }
    Ok(())
}
