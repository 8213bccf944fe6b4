//! Jailed vmms (`--jail-vms`) through the agent, on one real guest. The test makes a network
//! namespace with a bridge and an operator's tap (removed again with everything in it; no
//! traffic leaves it) and runs the agent there. The VM has a data disk, a NIC on a tap the agent
//! makes on the bridge and a NIC on the operator's tap. While it runs: the process running the
//! VM is the launcher's child, as the VM's jail uid, in a root holding its kernel and disk and
//! nothing of the host, in a network namespace of its own; the disk belongs to the jail uid; the
//! console reaches GetConsole; the guest answers pings on the agent's tap and the operator's tap
//! is attached. After a SIGKILL of the agent, the VM is re-adopted with the same pid (through
//! the socket in the jail, served by the jail uid). A full and a diff snapshot, which the jailed
//! vmm writes in its jail, land in the agent's store as root's, recording host paths. After a
//! stop: the guest's disk write is in the file, whose owner is given back, and no jail
//! directory, cgroup or agent tap is left; the diff snapshot restores (the guest counts on) in a
//! jail of its own, which shows it only its snapshot chain and read-only disk, and its own next
//! diff snapshot builds on the one it came from.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::Result;
use common::snapshots::{create, restored, snapshot_of};
use common::{
    probe_counters, probe_fields, probe_spec, state_dir, wait_console, wait_state, Agent, BOOT_TIMEOUT,
};
use harness::NetNs;
use vmm_agent::proto::snapshot_service_client::SnapshotServiceClient;
use vmm_agent::proto::{
    CreateVmRequest, DeleteVmRequest, Disk, GetVmRequest, NicSpec, RestoreSnapshotRequest, SnapshotKind,
    StopVmRequest, VmState,
};

const FIRST_UID: u32 = 910_000_000;

fn ns_link(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_vms_run_confined_and_are_readopted() -> Result<()> {
    harness::require_kvm();
    let ns = NetNs::new("agentjail")?;
    ns.add_bridge("ajbr0", "10.78.0.1/24", &[])?;
    ns.add_tap("ajtap0", "10.78.1.1/24")?;
    let dir = state_dir("agent-jail")?;
    let data = dir.path().join("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20])?;
    let ro = dir.path().join("ro.img");
    std::fs::write(&ro, vec![0u8; 1 << 20])?;
    let uids_flag = format!("{FIRST_UID}:10");
    let flags = ["--bridge", "ajbr0", "--jail-vms", "--jail-uids", &uids_flag];
    let mut agent = Agent::start_in(Some(ns.name()), dir.path(), &flags)?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;

    let mut spec = probe_spec("net-info,blk-write:vda:0:64k:7,blk-flush:vda,counter")?;
    spec.cmdline
        .push_str(" vmmprobe.count=1000000 ip=10.78.0.2::10.78.0.1:255.255.255.0::eth0:off");
    spec.track_dirty_pages = true;
    spec.disks = vec![
        Disk {
            path: data.display().to_string(),
            ..Default::default()
        },
        // Read-only: a restore opens it where the snapshot says, which must be the host's path.
        Disk {
            path: ro.display().to_string(),
            read_only: true,
            ..Default::default()
        },
    ];
    spec.nics = vec![
        NicSpec {
            id: "eth0".into(),
            ..Default::default()
        },
        NicSpec {
            id: "eth1".into(),
            tap: "ajtap0".into(),
            ..Default::default()
        },
    ];
    let vm = vms
        .create_vm(CreateVmRequest {
            vm_id: "jailed".into(),
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(vm.state(), VmState::Running, "{vm:?}");
    assert_eq!(vm.jail_uid, FIRST_UID, "{vm:?}");

    // The launcher (the pid the agent holds) runs the VM in its child, confined.
    let launcher = vm.pid;
    let child = vmm_agent::process::vm_process(launcher);
    assert_ne!(child, launcher, "no jailed child under the launcher {launcher}");
    assert_eq!(common::uids(child), vec![FIRST_UID; 4]);
    let root = format!("/proc/{child}/root");
    for inside in [
        "boot/kernel",
        "boot/initrd",
        "drives/disk0",
        "dev/kvm",
        "run/api.sock",
    ] {
        assert!(
            std::path::Path::new(&root).join(inside).exists(),
            "{inside} missing in the jail"
        );
    }
    for host in ["etc/passwd", "usr", "sys"] {
        assert!(
            !std::path::Path::new(&root).join(host).exists(),
            "/{host} visible in the jail"
        );
    }
    assert_ne!(
        ns_link(child),
        ns_link(agent.child.id()),
        "the jail shares the agent's netns"
    );
    assert_eq!(
        std::fs::metadata(&data)?.uid(),
        FIRST_UID,
        "the disk belongs to the jail uid"
    );
    let jail_dir = dir.path().join("jails/jailed");
    assert!(jail_dir.join("run/api.sock").exists());

    // The console, the guest's NICs and its disk write.
    let console = wait_console(&mut vms, "jailed", "vmmprobe: counter=2", BOOT_TIMEOUT).await?;
    let write = probe_fields(&console, "blk-write")?;
    assert_eq!(write["result"], "0", "{console}");
    ns.ping("10.78.0.2", 5, 10)?;
    let operators = ns.ip(&["link", "show", "dev", "ajtap0"])?;
    assert!(
        operators.contains("LOWER_UP"),
        "the operator's tap is not attached: {operators}"
    );
    let eth1 = console
        .lines()
        .find(|l| l.contains("net-info dev=eth1"))
        .unwrap_or_default();
    let mac = &vm
        .spec
        .as_ref()
        .map(|s| s.nics[1].mac.clone())
        .unwrap_or_default();
    assert!(eth1.contains(&format!("mac={mac}")), "{console}");

    // Snapshots: written by the jailed vmm in its jail, moved to the store by the agent.
    let channel = agent.channel().await?;
    let mut snaps = SnapshotServiceClient::new(channel.clone());
    let full = snapshot_of(
        &mut snaps,
        &channel,
        create("jailed", "jfull", SnapshotKind::Full),
    )
    .await?;
    // Read by the vmm before its jail hid /proc/cpuinfo.
    assert_eq!(full.cpu_model, vmm_api::snapshot::host_cpu_model());
    let counted =
        probe_counters(&wait_console(&mut vms, "jailed", "vmmprobe: counter=", BOOT_TIMEOUT).await?);
    let counted_before = counted.last().copied().unwrap_or(0);
    let diff = snapshot_of(
        &mut snaps,
        &channel,
        create("jailed", "jdiff", SnapshotKind::Diff),
    )
    .await?;
    assert_eq!(diff.base_snapshot_id, "jfull", "{diff:?}");
    for id in ["jfull", "jdiff"] {
        let snapshot = dir.path().join("snapshots").join(id);
        let mut files = vec![snapshot.clone()];
        files.extend(
            std::fs::read_dir(&snapshot)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<Vec<_>, _>>()?,
        );
        for file in &files {
            assert_eq!(
                std::fs::metadata(file)?.uid(),
                0,
                "{} is not root's",
                file.display()
            );
        }
        let state = String::from_utf8_lossy(&std::fs::read(snapshot.join("state"))?).into_owned();
        assert!(
            state.contains(&*ro.to_string_lossy()),
            "{id} does not record the host path of its read-only disk"
        );
        assert!(!state.contains("/drives/"), "{id} records in-jail paths");
    }
    let mirror = jail_dir.join(dir.path().strip_prefix("/")?);
    assert!(
        !mirror.exists(),
        "the jail's snapshot directory is left: {}",
        mirror.display()
    );
    wait_state(&mut vms, "jailed", VmState::Running, Duration::from_secs(10)).await?;

    // Re-adopted after an agent crash: same launcher, still running.
    agent.kill9();
    let agent = Agent::start_in(Some(ns.name()), dir.path(), &flags)?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let vm = vms
        .get_vm(GetVmRequest {
            vm_id: "jailed".into(),
        })
        .await?
        .into_inner();
    assert_eq!((vm.state(), vm.pid), (VmState::Running, launcher), "{vm:?}");

    let stopped = vms
        .stop_vm(StopVmRequest {
            vm_id: "jailed".into(),
            request_id: String::new(),
            timeout_ms: 0,
            force: true,
        })
        .await?
        .into_inner();
    assert_eq!(stopped.state(), VmState::Stopped, "{stopped:?}");
    assert!(!common::alive(launcher) && !common::alive(child));
    let written = std::fs::read(&data)?;
    let crc = format!("{:08x}", harness::crc32(&written[..64 * 1024]));
    assert_eq!(crc, write["crc32"], "the guest's write is not in the file");
    assert_eq!(
        std::fs::metadata(&data)?.uid(),
        0,
        "the disk's owner was not given back"
    );
    assert!(!jail_dir.exists(), "the jail directory is left");
    for group in ["/sys/fs/cgroup/vmm/jailed", "/sys/fs/cgroup/cpu/vmm/jailed"] {
        assert!(!std::path::Path::new(group).exists(), "{group} is left");
    }
    assert!(
        !ns.links()?.iter().any(|l| l.starts_with("vt")),
        "an agent tap is left: {:?}",
        ns.links()?
    );

    // The diff chain restores (the operator's tap is free again): the guest counts on.
    let channel = agent.channel().await?;
    let mut snaps = SnapshotServiceClient::new(channel.clone());
    let restore = RestoreSnapshotRequest {
        snapshot_id: "jdiff".into(),
        vm_id: "jclone".into(),
        ..Default::default()
    };
    let clone = restored(&mut snaps, &channel, restore).await?;
    assert_eq!(clone.state(), VmState::Running, "{clone:?}");
    let console = wait_console(&mut vms, "jclone", "vmmprobe: counter=", BOOT_TIMEOUT).await?;
    let after = probe_counters(&console);
    assert!(
        after.first().is_some_and(|n| *n > counted_before),
        "counted {counted_before} before the diff, the clone printed {after:?}"
    );
    assert!(!console.contains("Linux version"), "the clone booted:\n{console}");

    // The clone runs jailed too, as a uid of its own ("jailed" keeps its uid while it exists),
    // and sees the snapshots of its chain and its read-only disk at their host paths, and
    // nothing else of the agent's state directory (its writable disk came as a descriptor).
    assert!(
        clone.jail_uid > FIRST_UID && clone.jail_uid < FIRST_UID + 10,
        "{clone:?}"
    );
    let clone_child = vmm_agent::process::vm_process(clone.pid);
    assert_ne!(
        clone_child, clone.pid,
        "no jailed child under the clone's launcher"
    );
    assert_eq!(common::uids(clone_child), vec![clone.jail_uid; 4]);
    let clone_root = std::path::PathBuf::from(format!("/proc/{clone_child}/root"));
    let seen = |host: &std::path::Path| clone_root.join(host.strip_prefix("/").unwrap_or(host)).exists();
    for id in ["jfull", "jdiff"] {
        let snapshot = dir.path().join("snapshots").join(id);
        assert!(
            seen(&snapshot.join("memory")),
            "{id} is not mirrored in the clone's jail"
        );
    }
    assert!(seen(&ro), "the read-only disk is not mirrored");
    assert!(!seen(&data), "the first VM's disk is visible in the clone's jail");
    assert!(
        !seen(&dir.path().join("vms")),
        "the VMs' directories are visible in the clone's jail"
    );
    // Its next diff builds on the snapshot it came from: it remembers its host path.
    let clone_diff = snapshot_of(
        &mut snaps,
        &channel,
        create("jclone", "jclonediff", SnapshotKind::Diff),
    )
    .await?;
    assert_eq!(clone_diff.base_snapshot_id, "jdiff", "{clone_diff:?}");

    for vm_id in ["jclone", "jailed"] {
        vms.delete_vm(DeleteVmRequest {
            vm_id: vm_id.into(),
            request_id: String::new(),
        })
        .await?;
    }
    assert!(
        !dir.path().join("jails/jclone").exists(),
        "the clone's jail directory is left"
    );
    Ok(())
}
