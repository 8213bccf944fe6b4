//! NICs through the agent, on a real guest: the test makes a network namespace with a TAP device
//! (removed again with everything in it; no traffic leaves it), runs the agent there, creates a
//! VM with a NIC on that tap and no MAC, sees the derived MAC in the stored spec and in the guest,
//! and pings the guest (configured by the kernel's `ip=`) from the host side of the tap. Invalid
//! NICs are INVALID_ARGUMENT naming the field.

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use common::{probe_spec, state_dir, wait_console, Agent, BOOT_TIMEOUT};
use harness::{probe_fields, NetNs};
use tonic::Code;
use vmm_agent::proto::{CreateVmRequest, DeleteVmRequest, NicSpec, VmState};

fn nic(id: &str, tap: &str, mac: &str) -> NicSpec {
    NicSpec {
        id: id.into(),
        tap: tap.into(),
        mac: mac.into(),
        ..Default::default()
    }
}

/// Pings `addr` from inside `ns` until it answers (the guest may still be bringing eth0 up).
fn ping(ns: &NetNs, addr: &str) -> Result<String> {
    let mut last = String::new();
    for _ in 0..10 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "5",
                addr,
            ])
            .output()?;
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return Ok(last);
        }
    }
    bail!("ping {addr} failed:\n{last}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_nic_on_a_tap_answers_pings() -> Result<()> {
    harness::require_kvm();
    let ns = NetNs::new("agentnic")?;
    ns.add_tap("antap0", "10.79.0.1/24")?;
    let dir = state_dir("agent-nic")?;
    let agent = Agent::start_in(Some(ns.name()), dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;

    let mut spec = probe_spec("net-info,idle")?;
    spec.cmdline
        .push_str(" ip=10.79.0.2::10.79.0.1:255.255.255.0::eth0:off");
    // Refused whole, naming the NIC field.
    let invalid = [
        (
            vec![nic("eth0", "antap0", ""), nic("eth1", "antap0", "nope")],
            "spec.nics[1].mac",
        ),
        (
            vec![nic("eth0", "antap0", ""), nic("eth0", "antap0", "")],
            "spec.nics[1].id",
        ),
        (vec![nic("eth0", "vmmt-missing", "")], "spec.nics[0].tap"),
        (vec![nic("eth0", "lo", "")], "spec.nics[0].tap"),
    ];
    for (nics, field) in invalid {
        let mut bad = spec.clone();
        bad.nics = nics;
        let err = vms
            .create_vm(CreateVmRequest {
                vm_id: "bad".into(),
                spec: Some(bad),
                request_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().starts_with(field), "{field}: {}", err.message());
    }

    spec.nics = vec![nic("eth0", "antap0", "")];
    let vm = vms
        .create_vm(CreateVmRequest {
            vm_id: "netvm".into(),
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(vm.state(), VmState::Running, "{vm:?}");
    let mac = vm
        .spec
        .as_ref()
        .map(|s| s.nics[0].mac.clone())
        .unwrap_or_default();
    assert_eq!(mac, vmm_agent::nics::derived_mac("netvm", "eth0").to_string());
    assert!(mac.starts_with("02:"), "{mac}");

    wait_console(&mut vms, "netvm", "BOOT-COMPLETE", BOOT_TIMEOUT).await?;
    // mtu= ends the probe's net-info line: the fields before it are complete.
    let console = wait_console(&mut vms, "netvm", "mtu=", Duration::from_secs(60)).await?;
    let eth0 = probe_fields(&console, "net-info dev=eth0");
    assert_eq!(eth0["mac"], mac, "{console}");
    assert_eq!(eth0["ip"], "10.79.0.2", "{console}");
    ping(&ns, "10.79.0.2")?;

    vms.delete_vm(DeleteVmRequest {
        vm_id: "netvm".into(),
        request_id: String::new(),
    })
    .await?;
    drop(agent);
    drop(ns);
    Ok(())
}
