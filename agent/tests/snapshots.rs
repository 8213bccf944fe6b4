//! Snapshots through the agent, on one real guest: a VM with a disk and a NIC (a counter running in
//! guest memory, data on its disk) is snapshotted while it runs (full, then diff), stopped, and
//! restored twice as new VMs on other taps; the clones continue the counter instead of booting.
//! Errors known at once are statuses (ALREADY_EXISTS, NOT_FOUND, FAILED_PRECONDITION for a stopped
//! VM, a base that a diff needs, a snapshot from another CPU model). The agent restarts in between
//! and keeps its snapshots; deleting everything leaves no files behind.

mod common;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use common::snapshots::{create, restore, restored, snapshot_of};
use common::{probe_counters, probe_spec, state_dir, wait_console, wait_state, Agent, BOOT_TIMEOUT};
use harness::NetNs;
use prost::Message;
use tonic::Code;
use vmm_agent::proto::snapshot_service_client::SnapshotServiceClient;
use vmm_agent::proto::{
    CreateVmRequest, DeleteSnapshotRequest, DeleteVmRequest, Disk, GetSnapshotRequest, ListSnapshotsRequest,
    NicOverride, NicSpec, RestoreSnapshotRequest, ResumeVmRequest, Snapshot, SnapshotKind, SnapshotState,
    StopVmRequest, VmState,
};

const DISK_BYTES: u64 = 4 << 20;

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Rewrites a stored snapshot's CPU model (the agent must be stopped).
fn pretend_taken_elsewhere(db: &Path, snapshot_id: &str) -> Result<()> {
    let conn = rusqlite::Connection::open(db)?;
    let blob: Vec<u8> = conn.query_row(
        "SELECT snapshot FROM snapshots WHERE snapshot_id = ?1",
        [snapshot_id],
        |r| r.get(0),
    )?;
    let mut s = Snapshot::decode(blob.as_slice())?;
    s.cpu_model = "AuthenticAMD Imaginary EPYC".into();
    conn.execute(
        "UPDATE snapshots SET snapshot = ?2 WHERE snapshot_id = ?1",
        rusqlite::params![snapshot_id, s.encode_to_vec()],
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restore_as_clones_and_refuse_what_cannot_work() -> Result<()> {
    harness::require_kvm();
    let ns = NetNs::new("agentsnap")?;
    ns.add_tap("sntap0", "10.81.0.1/24")?;
    ns.add_tap("sntap1", "10.81.1.1/24")?;
    ns.add_tap("sntap2", "10.81.2.1/24")?;
    let dir = state_dir("agent-snap")?;
    let disk = dir.path().join("data.img");
    std::fs::File::create(&disk)?.set_len(DISK_BYTES)?;
    let mut agent = Agent::start_in(Some(ns.name()), dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let mut channel = agent.channel().await?;
    let mut snaps = SnapshotServiceClient::new(channel.clone());

    let mut spec = probe_spec("blk-write:vda:0:64k:11,blk-flush:vda,counter")?;
    spec.cmdline.push_str(" vmmprobe.count=1000000");
    spec.track_dirty_pages = true;
    spec.disks = vec![Disk {
        path: disk.display().to_string(),
        ..Default::default()
    }];
    spec.nics = vec![NicSpec {
        id: "eth0".into(),
        tap: "sntap0".into(),
        ..Default::default()
    }];
    vms.create_vm(CreateVmRequest {
        vm_id: "src".into(),
        spec: Some(spec),
        request_id: String::new(),
    })
    .await?;
    wait_console(&mut vms, "src", "vmmprobe: counter=3", BOOT_TIMEOUT).await?;

    // Full, then a diff on it, while the VM runs; it runs again after each.
    let full = snapshot_of(&mut snaps, &channel, create("src", "full1", SnapshotKind::Full)).await?;
    assert_eq!(
        (full.state(), full.kind(), full.base_snapshot_id.as_str()),
        (SnapshotState::Ready, SnapshotKind::Full, "")
    );
    assert!(full.memory_bytes > 0 && full.disk_bytes > 0, "{full:?}");
    assert!(full.size_bytes >= full.memory_bytes, "{full:?}");
    assert_eq!(full.cpu_model, vmm_api::snapshot::host_cpu_model());
    assert_eq!(full.format_version, vmm_api::snapshot::FORMAT_VERSION);
    assert!(!full.vmm_version.is_empty());
    assert_eq!(full.spec.as_ref().map(|s| s.memory_mib), Some(128));
    wait_state(&mut vms, "src", VmState::Running, Duration::from_secs(10)).await?;
    let before = wait_console(&mut vms, "src", "vmmprobe: counter=", Duration::from_secs(10)).await?;
    let counted_before = probe_counters(&before).last().copied().unwrap_or(0);
    let diff = snapshot_of(&mut snaps, &channel, create("src", "diff1", SnapshotKind::Diff)).await?;
    assert_eq!(
        (diff.kind(), diff.base_snapshot_id.as_str()),
        (SnapshotKind::Diff, "full1")
    );
    assert!(diff.memory_bytes < full.memory_bytes, "{diff:?} vs {full:?}");

    // Known at once.
    let e = snaps
        .create_snapshot(create("src", "full1", SnapshotKind::Full))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = snaps
        .create_snapshot(create("nope", "s9", SnapshotKind::Full))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = snaps
        .create_snapshot(create("src", "Bad_Id", SnapshotKind::Full))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = snaps
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: "full1".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("diff1"), "{e:?}");

    vms.stop_vm(StopVmRequest {
        vm_id: "src".into(),
        force: true,
        ..Default::default()
    })
    .await?;
    let e = snaps
        .create_snapshot(create("src", "late", SnapshotKind::Full))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The diff chain restored on another tap: the counter goes on, the kernel does not boot.
    let clone = restored(&mut snaps, &channel, restore("diff1", "clone1", "sntap1")).await?;
    assert_eq!(clone.state(), VmState::Running, "{clone:?}");
    assert_eq!(clone.restored_from, "diff1");
    let clone_spec = clone.spec.clone().unwrap_or_default();
    assert_eq!(clone_spec.nics[0].tap, "sntap1");
    assert!(
        clone_spec.disks[0]
            .path
            .starts_with(&dir.path().join("vms/clone1").display().to_string()),
        "{clone_spec:?}"
    );
    let console = wait_console(&mut vms, "clone1", "vmmprobe: counter=", BOOT_TIMEOUT).await?;
    let after = probe_counters(&console);
    assert!(
        after.first().is_some_and(|n| *n > counted_before),
        "counted {counted_before} before, the clone printed {after:?}"
    );
    assert!(!console.contains("Linux version"), "the clone booted:\n{console}");

    // A second clone from the full snapshot, left paused, then resumed.
    let mut paused = restore("full1", "clone2", "sntap2");
    paused.start_paused = true;
    let clone2 = restored(&mut snaps, &channel, paused).await?;
    assert_eq!(clone2.state(), VmState::Paused, "{clone2:?}");
    vms.resume_vm(ResumeVmRequest {
        vm_id: "clone2".into(),
        request_id: String::new(),
    })
    .await?;
    wait_console(&mut vms, "clone2", "vmmprobe: counter=", BOOT_TIMEOUT).await?;

    // Restores refused at once; none leaves a VM behind.
    let refusals = [
        (restore("full1", "clone1", "sntap1"), Code::AlreadyExists),
        (restore("nope", "clone3", "sntap1"), Code::NotFound),
        (restore("full1", "clone3", "vmmt-missing"), Code::InvalidArgument),
        (
            RestoreSnapshotRequest {
                nics: vec![NicOverride {
                    id: "eth7".into(),
                    tap: "sntap1".into(),
                }],
                ..restore("full1", "clone3", "sntap1")
            },
            Code::InvalidArgument,
        ),
    ];
    for (request, code) in refusals {
        let e = snaps.restore_snapshot(request.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{request:?}: {e:?}");
    }

    // Listing: by VM, by label, in pages.
    let list = |vm_id: &str, selector: &str, page_size: u32, page_token: String| ListSnapshotsRequest {
        vm_id: vm_id.into(),
        label_selector: selector.into(),
        page_size,
        page_token,
    };
    let page = snaps
        .list_snapshots(list("src", "tier=gold", 1, String::new()))
        .await?
        .into_inner();
    assert_eq!(page.snapshots[0].snapshot_id, "diff1");
    let page = snaps
        .list_snapshots(list("src", "tier=gold", 1, page.next_page_token))
        .await?
        .into_inner();
    assert_eq!(page.snapshots[0].snapshot_id, "full1");
    assert!(page.next_page_token.is_empty());
    let none = snaps
        .list_snapshots(list("", "tier=lead", 0, String::new()))
        .await?
        .into_inner();
    assert!(none.snapshots.is_empty());
    // vmmctl shows the same, as JSON lines.
    let json_lines = |args: &[&str]| -> Result<Vec<serde_json::Value>> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmmctl"))
            .arg("--endpoint")
            .arg(format!("unix:{}", agent.socket.display()))
            .arg("--json")
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("vmmctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    };
    let listed = json_lines(&["snapshot", "list", "--vm", "src"])?;
    let ids: Vec<_> = listed.iter().map(|s| s["snapshot_id"].as_str()).collect();
    assert_eq!(ids, [Some("diff1"), Some("full1")]);
    assert_eq!(listed[0]["base_snapshot_id"], "full1");
    let creates = json_lines(&["operation", "list", "--kind", "create-snapshot"])?;
    assert_eq!(creates.len(), 2, "{creates:?}");
    assert!(creates.iter().all(|o| o["outcome"] == "ok"), "{creates:?}");

    // The agent restarts: snapshots stay; one now claims another CPU and is refused up front.
    agent.kill9();
    pretend_taken_elsewhere(&dir.path().join("state.db"), "full1")?;
    agent = Agent::start_in(Some(ns.name()), dir.path(), &[])?;
    agent.wait_serving().await?;
    vms = agent.vms().await?;
    channel = agent.channel().await?;
    snaps = SnapshotServiceClient::new(channel.clone());
    let kept = snaps
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: "diff1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(kept, diff);
    let e = snaps
        .restore_snapshot(restore("full1", "clone3", "sntap1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("Imaginary"), "{e:?}");
    wait_state(&mut vms, "clone1", VmState::Running, Duration::from_secs(30)).await?;

    // Deleting: the diff first, then its base; the clones keep running on their own files.
    for id in ["diff1", "full1"] {
        snaps
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.into(),
                request_id: String::new(),
            })
            .await?;
    }
    assert!(entries(&dir.path().join("snapshots")).is_empty());
    wait_state(&mut vms, "clone2", VmState::Running, Duration::from_secs(10)).await?;
    for vm_id in ["clone1", "clone2", "src"] {
        vms.delete_vm(DeleteVmRequest {
            vm_id: vm_id.into(),
            request_id: String::new(),
        })
        .await?;
    }
    assert!(entries(&dir.path().join("vms")).is_empty());
    drop(agent);
    drop(ns);
    Ok(())
}
