//! The agent is SIGKILLed while five VMs run (one running, four paused), one vmm is killed while the
//! agent is down, and the agent is started again: the four live VMs are re-adopted with the same pids
//! and states, the dead one is reported stopped with the reason, no duplicate vmm is started, the
//! watch resumes from the revision seen before the crash, and the re-adopted VMs still obey.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{alive, probe_spec, state_dir, vmm_processes_under, Agent};
use vmm_agent::proto::{
    CreateVmRequest, DeleteVmRequest, GetVmRequest, ListVmsRequest, PauseVmRequest, ResumeVmRequest,
    StopVmRequest, Vm, VmState, WatchEventType, WatchVmsRequest,
};

/// The VMs of the crash test, in listing order; the last is the one killed while the agent is down.
const IDS: [&str; 5] = ["ra", "rb", "rc", "rd", "re"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_survive_an_agent_crash_and_are_readopted() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-restart")?;
    let mut agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let mut before = Vec::new();
    for id in IDS {
        let vm = vms
            .create_vm(CreateVmRequest {
                vm_id: id.into(),
                spec: Some(probe_spec("idle")?),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(vm.state(), VmState::Running, "{vm:?}");
        // Paused guests cost no CPU on this small host.
        let vm = if id == "ra" {
            vm
        } else {
            vms.pause_vm(PauseVmRequest {
                vm_id: id.into(),
                request_id: String::new(),
            })
            .await?
            .into_inner()
        };
        before.push(vm);
    }
    let revision = before.iter().map(|v| v.revision).max().unwrap_or(0);

    agent.kill9();
    for vm in &before {
        assert!(alive(vm.pid), "{} died with the agent", vm.vm_id);
    }
    let victim = &before[IDS.len() - 1];
    vmm_agent::process::kill(victim.pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(victim.pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let listed: Vec<Vm> = vms.list_vms(ListVmsRequest::default()).await?.into_inner().vms;
    assert_eq!(listed.len(), IDS.len());
    assert_eq!(
        (listed[0].state(), listed[0].pid),
        (VmState::Running, before[0].pid),
        "{:?}",
        listed[0]
    );
    for i in 1..IDS.len() - 1 {
        assert_eq!(
            (listed[i].state(), listed[i].pid),
            (VmState::Paused, before[i].pid),
            "{:?}",
            listed[i]
        );
    }
    let dead = &listed[IDS.len() - 1];
    assert_eq!((dead.state(), dead.pid), (VmState::Stopped, 0));
    assert!(
        dead.state_reason.contains("while the agent was down"),
        "{}",
        dead.state_reason
    );
    let mut running = vmm_processes_under(dir.path());
    running.sort();
    let mut expected: Vec<u32> = before[..IDS.len() - 1].iter().map(|v| v.pid).collect();
    expected.sort();
    assert_eq!(running, expected, "no duplicate vmm was started");

    // The watch resumes after the last revision seen before the crash: the victim's stop follows.
    let mut watch = vms
        .watch_vms(WatchVmsRequest {
            from_revision: revision,
        })
        .await?
        .into_inner();
    let mut saw_victim_stopped = false;
    let mut last = revision;
    while !saw_victim_stopped {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await??
            .expect("an event");
        assert_eq!(event.revision, last + 1);
        last = event.revision;
        assert_eq!(event.r#type(), WatchEventType::Updated);
        let vm = event.vm.expect("a VM");
        saw_victim_stopped |= vm.vm_id == victim.vm_id && vm.state() == VmState::Stopped;
    }
    assert!(saw_victim_stopped);

    // The running guest went on booting through the crash.
    common::wait_console(&mut vms, "ra", "BOOT-COMPLETE", common::BOOT_TIMEOUT).await?;

    // Re-adopted VMs obey the new agent over their control sockets.
    let resumed = vms
        .resume_vm(ResumeVmRequest {
            vm_id: "rb".into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(resumed.state(), VmState::Running);
    let stopped = vms
        .stop_vm(StopVmRequest {
            vm_id: "ra".into(),
            request_id: String::new(),
            timeout_ms: 0,
            force: true,
        })
        .await?
        .into_inner();
    assert_eq!(stopped.state(), VmState::Stopped, "{stopped:?}");
    assert!(!alive(before[0].pid));
    // A re-adopted vmm that exits on its own is noticed through its control connection.
    vmm_agent::process::kill(before[1].pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let vm = vms
            .get_vm(GetVmRequest { vm_id: "rb".into() })
            .await?
            .into_inner();
        if vm.state() == VmState::Failed {
            assert!(vm.state_reason.contains("vanished"), "{}", vm.state_reason);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{vm:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in IDS {
        vms.delete_vm(DeleteVmRequest {
            vm_id: id.into(),
            request_id: String::new(),
        })
        .await?;
    }
    assert!(vmm_processes_under(dir.path()).is_empty());
    Ok(())
}

/// With `--restore-on-boot`, a VM that should run but whose vmm is gone (as after a host reboot)
/// boots again from its stored spec when the agent starts; a VM stopped on request stays stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_on_boot_starts_again_the_vms_that_should_run() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-restore")?;
    let mut agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let mut pids = Vec::new();
    for id in ["keep", "off"] {
        let vm = vms
            .create_vm(CreateVmRequest {
                vm_id: id.into(),
                spec: Some(probe_spec("idle")?),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(vm.desired_state(), VmState::Running);
        pids.push(vm.pid);
    }
    let off = vms
        .stop_vm(StopVmRequest {
            vm_id: "off".into(),
            request_id: String::new(),
            timeout_ms: 0,
            force: true,
        })
        .await?
        .into_inner();
    assert_eq!(
        (off.state(), off.desired_state()),
        (VmState::Stopped, VmState::Stopped)
    );
    // The host "reboots": the agent and every vmm die.
    agent.kill9();
    vmm_agent::process::kill(pids[0]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(pids[0]) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let agent = Agent::start(dir.path(), &["--restore-on-boot"])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let keep = vms
        .get_vm(GetVmRequest { vm_id: "keep".into() })
        .await?
        .into_inner();
    assert_eq!(keep.state(), VmState::Running, "{keep:?}");
    assert_ne!(keep.pid, pids[0], "a new vmm");
    assert!(alive(keep.pid));
    common::wait_console(&mut vms, "keep", "BOOT-COMPLETE", common::BOOT_TIMEOUT).await?;
    let off = vms
        .get_vm(GetVmRequest { vm_id: "off".into() })
        .await?
        .into_inner();
    assert_eq!((off.state(), off.pid), (VmState::Stopped, 0));
    assert_eq!(vmm_processes_under(dir.path()), vec![keep.pid]);
    for id in ["keep", "off"] {
        vms.delete_vm(DeleteVmRequest {
            vm_id: id.into(),
            request_id: String::new(),
        })
        .await?;
    }
    assert!(vmm_processes_under(dir.path()).is_empty());
    Ok(())
}
