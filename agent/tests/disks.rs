//! A writable disk keeps what the guest wrote: through a stop and start and an agent crash in
//! between, the guest reads back the data it wrote in its previous run (through the in-kernel probe).

mod common;

use anyhow::Result;
use common::{probe_fields, probe_spec, state_dir, wait_console, Agent, BOOT_TIMEOUT};
use vmm_agent::proto::{CreateVmRequest, DeleteVmRequest, Disk, StartVmRequest, StopVmRequest, VmState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_data_survives_stop_start_and_agent_restart() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-disks")?;
    let image = dir.path().join("data.img");
    std::fs::write(&image, vec![0u8; 1 << 20])?;
    let mut spec = probe_spec("blk-read:vda:0:4096,blk-write:vda:0:4096:9,blk-flush:vda,idle")?;
    spec.disks = vec![Disk {
        path: image.display().to_string(),
        read_only: false,
        root: false,
        ..Default::default()
    }];
    let mut agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    vms.create_vm(CreateVmRequest {
        vm_id: "disk".into(),
        spec: Some(spec),
        request_id: String::new(),
    })
    .await?;
    let first = wait_console(&mut vms, "disk", "vmmprobe: idle", BOOT_TIMEOUT).await?;
    let read_before = probe_fields(&first, "blk-read dev=vda")?;
    let written = probe_fields(&first, "blk-write dev=vda")?;
    assert_eq!(written["result"], "0", "{first}");
    assert_eq!(probe_fields(&first, "blk-flush dev=vda")?["result"], "0");
    assert_ne!(
        read_before["crc32"], written["crc32"],
        "the disk started out zeroed"
    );
    let on_host = std::fs::read(&image)?;
    assert!(
        on_host[..4096].iter().any(|b| *b != 0),
        "the write reached the image file"
    );
    assert_eq!(on_host.len(), 1 << 20);

    let stopped = vms
        .stop_vm(StopVmRequest {
            vm_id: "disk".into(),
            request_id: String::new(),
            timeout_ms: 20_000,
            force: false,
        })
        .await?
        .into_inner();
    assert_eq!(stopped.state(), VmState::Stopped);

    agent.kill9();
    let agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let started = vms
        .start_vm(StartVmRequest {
            vm_id: "disk".into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(started.state(), VmState::Running);
    let second = wait_console(&mut vms, "disk", "vmmprobe: idle", BOOT_TIMEOUT).await?;
    let read_after = probe_fields(&second, "blk-read dev=vda")?;
    assert_eq!(read_after["result"], "0");
    assert_eq!(
        read_after["crc32"], written["crc32"],
        "the second boot reads what the first wrote"
    );
    vms.delete_vm(DeleteVmRequest {
        vm_id: "disk".into(),
        request_id: String::new(),
    })
    .await?;
    assert!(
        image.exists(),
        "deleting a VM leaves the disk images it was given"
    );
    Ok(())
}
