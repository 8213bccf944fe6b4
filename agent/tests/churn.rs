//! Many calls at once and many create/delete cycles: concurrent creates either fit or are refused
//! with nothing half made, cycles leave no process, file or descriptor behind, and an oversized
//! message is refused while the agent keeps serving.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{probe_spec, state_dir, vmm_processes_under, wait_state, Agent};
use tonic::Code;
use vmm_agent::proto::host_service_client::HostServiceClient;
use vmm_agent::proto::{
    CreateVmRequest, DeleteVmRequest, GetHostRequest, GetVmRequest, PauseVmRequest, VmSpec, VmState,
};

/// A file that exists but is no kernel: its vmm exits with a setup error at once.
fn junk_spec() -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: "/etc/hostname".into(),
        ..Default::default()
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_fit_or_are_refused_whole() -> Result<()> {
    let dir = state_dir("agent-concurrent")?;
    // 256 MiB allocatable: four 64 MiB VMs at a time.
    let reserve = vmm_agent::host::host_memory_mib().saturating_sub(256);
    let agent = Agent::start(dir.path(), &["--reserve-memory-mib", &reserve.to_string()])?;
    agent.wait_serving().await?;
    let vms = agent.vms().await?;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut client = vms.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("c{i}");
            let result = client
                .create_vm(CreateVmRequest {
                    vm_id: id.clone(),
                    spec: Some(junk_spec()),
                    request_id: format!("create-{id}"),
                })
                .await;
            (id, result.map(|r| r.into_inner()).map_err(|e| e.code()))
        }));
    }
    let mut vms = vms;
    let (mut created, mut refused) = (0, 0);
    for task in tasks {
        let (id, result) = task.await?;
        let stored = vms.get_vm(GetVmRequest { vm_id: id.clone() }).await;
        match result {
            Ok(vm) => {
                created += 1;
                assert_eq!(vm.vm_id, id);
                assert!(stored.is_ok(), "{id} was created but is gone");
            }
            Err(code) => {
                refused += 1;
                assert_eq!(code, Code::ResourceExhausted, "{id}");
                assert_eq!(stored.unwrap_err().code(), Code::NotFound, "{id} half made");
            }
        }
    }
    eprintln!("{created} created, {refused} refused");
    assert_eq!(created + refused, 50);
    assert!(created >= 4, "at least the first four fit: {created}");
    let host = HostServiceClient::new(agent.channel().await?)
        .get_host(GetHostRequest {})
        .await?
        .into_inner();
    assert!(host.allocated_memory_mib <= host.allocatable_memory_mib);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_delete_cycles_leak_nothing() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-cycles")?;
    let agent = Agent::start(dir.path(), &["--vms-cpu-max", "1.5"])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let agent_pid = agent.child.id();
    let cycle = |vms: &mut vmm_agent::proto::vm_service_client::VmServiceClient<_>, i: usize| {
        let mut vms = vms.clone();
        async move {
            let id = format!("cycle-{i}");
            vms.create_vm(CreateVmRequest {
                vm_id: id.clone(),
                spec: Some(junk_spec()),
                request_id: String::new(),
            })
            .await?;
            wait_state(&mut vms, &id, VmState::Failed, Duration::from_secs(10)).await?;
            vms.delete_vm(DeleteVmRequest {
                vm_id: id,
                request_id: String::new(),
            })
            .await?;
            Ok::<_, anyhow::Error>(())
        }
    };
    // One cycle first, so that lazily opened descriptors (the database's WAL) are counted.
    cycle(&mut vms, 0).await?;
    let fds_before = fd_count(agent_pid);
    // 100 cycles in all: 96 more here, the first above and three real guests below.
    for i in 1..=96 {
        cycle(&mut vms, i).await?;
    }
    // Real guests too, paused at once so that they cost no CPU, then deleted while paused.
    for i in 0..3 {
        let id = format!("real-{i}");
        let vm = vms
            .create_vm(CreateVmRequest {
                vm_id: id.clone(),
                spec: Some(probe_spec("idle")?),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(vm.state(), VmState::Running, "{vm:?}");
        // The vmm runs in its own CPU cgroup under the agent's capped parent.
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.pid))?;
        let name = vmm_agent::cgroups::default_name(dir.path());
        assert!(
            cgroups.lines().any(|l| l.ends_with(&format!("/{name}/{id}"))),
            "{cgroups}"
        );
        vms.pause_vm(PauseVmRequest {
            vm_id: id.clone(),
            request_id: String::new(),
        })
        .await?;
        vms.delete_vm(DeleteVmRequest {
            vm_id: id,
            request_id: String::new(),
        })
        .await?;
        assert!(!common::alive(vm.pid));
    }
    assert!(vmm_processes_under(dir.path()).is_empty());
    // The cap is on the parent; no VM's group is left in it.
    let parent = common::cgroup_parent(dir.path()).expect("the VMs' parent cgroup");
    let cap = std::fs::read_to_string(parent.join("cpu.max"))
        .or_else(|_| std::fs::read_to_string(parent.join("cpu.cfs_quota_us")))?;
    assert!(cap.starts_with("150000"), "{cap}");
    let groups: Vec<_> = std::fs::read_dir(&parent)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .collect();
    assert!(groups.is_empty(), "VM cgroups left: {groups:?}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("vms"))?.collect();
    assert!(left.is_empty(), "{left:?}");
    let fds_after = fd_count(agent_pid);
    assert!(
        fds_after <= fds_before + 2,
        "descriptors grew from {fds_before} to {fds_after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_and_the_agent_keeps_serving() -> Result<()> {
    let dir = state_dir("agent-oversized")?;
    let agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let mut spec = junk_spec();
    spec.cmdline = "x".repeat(5 << 20);
    let err = vms
        .create_vm(CreateVmRequest {
            vm_id: "big".into(),
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let gone = vms
        .get_vm(GetVmRequest { vm_id: "big".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    HostServiceClient::new(agent.channel().await?)
        .get_host(GetHostRequest {})
        .await?;
    Ok(())
}
