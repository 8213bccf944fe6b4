//! Memory levers through the agent on a real guest: a VM created with a balloon, KSM and huge
//! pages off; `UpdateVm` sets a memory target that the guest's balloon driver reaches (`GetBalloon`
//! shows it), the guest then runs short of memory and its balloon deflates on OOM instead of the
//! allocation failing; a target set while the VM is stopped is the one its next start boots with.
//! Every refusal has its status code.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{probe_spec, state_dir, wait_console, Agent, BOOT_TIMEOUT};
use tonic::transport::Channel;
use tonic::Code;
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{
    BalloonSpec, BalloonStatus, CreateVmRequest, DeleteVmRequest, GetBalloonRequest, HugePages,
    StartVmRequest, StopVmRequest, UpdateVmRequest, VmState,
};

const MEMORY_MIB: u64 = 192;
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

async fn balloon(vms: &mut VmServiceClient<Channel>, id: &str) -> Result<BalloonStatus, tonic::Status> {
    Ok(vms
        .get_balloon(GetBalloonRequest { vm_id: id.into() })
        .await?
        .into_inner())
}

/// Polls GetBalloon until `done` holds.
async fn wait_balloon(
    vms: &mut VmServiceClient<Channel>,
    id: &str,
    what: &str,
    done: impl Fn(&BalloonStatus) -> bool,
) -> Result<BalloonStatus> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let b = balloon(vms, id).await?;
        if done(&b) {
            return Ok(b);
        }
        if Instant::now() > deadline {
            bail!("{what}: the balloon is {b:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn update(id: &str, target: Option<u64>, stats: Option<u32>, request_id: &str) -> UpdateVmRequest {
    UpdateVmRequest {
        vm_id: id.into(),
        request_id: request_id.into(),
        memory_target_mib: target,
        balloon_stats_interval_s: stats,
    }
}

/// The probe line starting with `prefix` on the console, once it is there.
async fn probe_line(vms: &mut VmServiceClient<Channel>, id: &str, prefix: &str) -> Result<String> {
    let console = wait_console(vms, id, prefix, STEP_TIMEOUT).await?;
    let start = console.find(prefix).context("prefix")?;
    Ok(console[start..].lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_target_inflates_the_balloon_and_deflate_on_oom_gives_memory_back() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-mem")?;
    let agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;

    // The guest waits for the host to take 128 MiB, then allocates 56 MiB the ordinary way: with
    // ~40 MiB free it only gets there by the balloon giving pages back on OOM (1 MiB per OOM
    // event, a few seconds each on kvm_pvm, hence not more).
    let id = "mem";
    let mut spec = probe_spec("balloon-wait:128m,mem-info,mem-alloc:56m:oom,mem-info,idle")?;
    spec.memory_mib = MEMORY_MIB;
    spec.balloon = Some(BalloonSpec {
        amount_mib: 0,
        deflate_on_oom: true,
        stats_interval_s: 1,
        free_page_reporting: true,
    });
    spec.mergeable = true;
    spec.hugepages = HugePages::Off as i32;
    let vm = vms
        .create_vm(CreateVmRequest {
            vm_id: id.into(),
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(vm.state(), VmState::Running, "{vm:?}");
    // The options reach the vmm's configuration.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("vms").join(id).join("vm.json"))?)?;
    let machine = &config["machine"];
    assert_eq!(machine["mergeable"], true, "{machine}");
    assert_eq!(machine["hugepages"], "off", "{machine}");
    assert_eq!(machine["balloon"]["deflate_on_oom"], true, "{machine}");
    wait_console(&mut vms, id, "BOOT-COMPLETE", BOOT_TIMEOUT).await?;

    // A memory target of 64 MiB: the balloon is to hold the other 128.
    let request = update(id, Some(64), None, "update-mem-1");
    let updated = vms.update_vm(request.clone()).await?.into_inner();
    let stored = updated
        .spec
        .as_ref()
        .and_then(|s| s.balloon.as_ref())
        .context("balloon")?;
    assert_eq!(stored.amount_mib, 128);
    // A retry answers the first result.
    assert_eq!(vms.update_vm(request).await?.into_inner(), updated);
    let full = wait_balloon(&mut vms, id, "inflating to 128 MiB", |b| b.actual_mib == 128).await?;
    assert_eq!((full.target_mib, full.guest_memory_mib), (128, 64), "{full:?}");
    assert!(full.inflated_pages >= 128 * 256, "{full:?}");
    assert_eq!(full.invalid_pages + full.invalid_requests, 0, "{full:?}");
    let stats = wait_balloon(&mut vms, id, "guest statistics", |b| {
        b.total_memory_bytes.is_some()
    })
    .await?;
    assert!(stats.free_memory_bytes.is_some(), "{stats:?}");

    // Short of memory, the guest takes pages back from the balloon rather than fail.
    let alloc = probe_line(&mut vms, id, "vmmprobe: mem-alloc").await?;
    assert!(alloc.contains("result=0"), "{alloc}");
    let after = wait_balloon(&mut vms, id, "deflating on OOM", |b| b.actual_mib < 128).await?;
    assert!(after.deflated_pages > 0, "{after:?}");
    assert_eq!(after.target_mib, 128, "the host's target stays: {after:?}");
    eprintln!("deflate on OOM: {alloc}; balloon {after:?}");

    // Refusals.
    for (req, code, field) in [
        (
            update(id, None, None, ""),
            Code::InvalidArgument,
            "memory_target_mib",
        ),
        (
            update(id, Some(0), None, ""),
            Code::InvalidArgument,
            "memory_target_mib",
        ),
        (
            update(id, Some(MEMORY_MIB + 1), None, ""),
            Code::InvalidArgument,
            "memory_target_mib",
        ),
        (
            update(id, None, Some(3601), ""),
            Code::InvalidArgument,
            "balloon_stats_interval_s",
        ),
        (update("nope", Some(64), None, ""), Code::NotFound, ""),
        (
            update("Bad_Id", Some(64), None, ""),
            Code::InvalidArgument,
            "vm_id",
        ),
    ] {
        let err = vms.update_vm(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    let err = vms
        .update_vm(update(id, Some(100), None, "update-mem-1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Stopped: the target is stored and the next start boots with it; there is no balloon to ask.
    vms.stop_vm(StopVmRequest {
        vm_id: id.into(),
        force: true,
        ..Default::default()
    })
    .await?;
    let err = balloon(&mut vms, id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let vm = vms
        .update_vm(update(id, Some(160), Some(2), ""))
        .await?
        .into_inner();
    let stored = vm
        .spec
        .as_ref()
        .and_then(|s| s.balloon.as_ref())
        .context("balloon")?;
    assert_eq!((stored.amount_mib, stored.stats_interval_s), (32, 2));
    let started = vms
        .start_vm(StartVmRequest {
            vm_id: id.into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(started.state(), VmState::Running);
    let b = balloon(&mut vms, id).await?;
    assert_eq!((b.target_mib, b.stats_interval_s), (32, 2), "{b:?}");

    // A VM without a balloon has no memory target to change.
    let plain = vms
        .create_vm(CreateVmRequest {
            vm_id: "plain".into(),
            spec: Some(probe_spec("idle")?),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(plain.state(), VmState::Running);
    let err = vms
        .update_vm(update("plain", Some(64), None, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no balloon"), "{}", err.message());
    let err = balloon(&mut vms, "plain").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    for vm_id in [id, "plain"] {
        vms.delete_vm(DeleteVmRequest {
            vm_id: vm_id.into(),
            request_id: String::new(),
        })
        .await?;
    }
    Ok(())
}
