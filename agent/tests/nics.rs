//! NICs through the agent, on a real guest: the test makes a network namespace with a bridge
//! (with an address) and a TAP device (removed again with everything in it; no traffic leaves
//! it), runs the agent there with `--bridge`, and creates one VM with two NICs and no MACs: eth0
//! on a tap the agent makes on the bridge, eth1 on the existing tap. It sees the derived MACs in
//! the stored spec and in the guest, pings the guest (eth0, configured by the kernel's `ip=`)
//! from the bridge, finds the agent's tap as a port of the bridge with the MTU asked, gone after
//! StopVm, back after StartVm and gone after DeleteVm; a snapshot of it restored as a new VM gets
//! a new agent-made tap on the same bridge and answers pings there. Invalid NICs are INVALID_ARGUMENT naming
//! the field. A second test cycles VMs that fail to boot through agent-made taps and finds none
//! left.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::snapshots::{create, restore, restored, snapshot_of};
use common::{probe_spec, state_dir, wait_console, wait_state, Agent, BOOT_TIMEOUT};
use harness::{probe_fields, NetNs};
use tonic::Code;
use vmm_agent::nics::agent_tap_name;
use vmm_agent::proto::snapshot_service_client::SnapshotServiceClient;
use vmm_agent::proto::{
    CreateVmRequest, DeleteVmRequest, NicSpec, SnapshotKind, StartVmRequest, StopVmRequest, VmSpec, VmState,
};

fn nic(id: &str, tap: &str, mac: &str) -> NicSpec {
    NicSpec {
        id: id.into(),
        tap: tap.into(),
        mac: mac.into(),
        ..Default::default()
    }
}

/// A NIC on a tap the agent makes, on `bridge` (empty: the agent's `--bridge`).
fn bridged(id: &str, bridge: &str, mtu: u32) -> NicSpec {
    NicSpec {
        id: id.into(),
        bridge: bridge.into(),
        mtu,
        ..Default::default()
    }
}

/// `tap` as `ip -d link show` describes it in `ns`, or `None` if there is no such link.
fn link(ns: &NetNs, tap: &str) -> Option<String> {
    ns.ip(&["-d", "link", "show", "dev", tap]).ok()
}

/// The agent-made taps (`vt*`) in `ns`.
fn agent_taps(ns: &NetNs) -> Result<Vec<String>> {
    Ok(ns.links()?.into_iter().filter(|l| l.starts_with("vt")).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_nics_on_an_agent_made_tap_and_an_existing_tap() -> Result<()> {
    harness::require_kvm();
    let ns = NetNs::new("agentnic")?;
    ns.add_bridge("anbr0", "10.79.0.1/24", &[])?;
    ns.add_tap("antap0", "10.79.1.1/24")?;
    let dir = state_dir("agent-nic")?;
    let agent = Agent::start_in(Some(ns.name()), dir.path(), &["--bridge", "anbr0"])?;
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
        (
            vec![nic("eth0", "antap0", ""), bridged("eth1", "anbr-missing", 0)],
            "spec.nics[1].bridge: no network interface 'anbr-missing'",
        ),
        (
            vec![bridged("eth0", "antap0", 0)],
            "spec.nics[0].bridge: 'antap0' is not a bridge",
        ),
        (vec![bridged("eth0", "", 67)], "spec.nics[0].mtu"),
        (
            vec![NicSpec {
                bridge: "anbr0".into(),
                ..nic("eth0", "antap0", "")
            }],
            "spec.nics[0].bridge",
        ),
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
    assert!(agent_taps(&ns)?.is_empty(), "a refused VM made a tap");

    // eth0 on the agent's --bridge, with its own MTU; eth1 on the existing tap.
    spec.nics = vec![bridged("eth0", "", 1400), nic("eth1", "antap0", "")];
    let vm = vms
        .create_vm(CreateVmRequest {
            vm_id: "netvm".into(),
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(vm.state(), VmState::Running, "{vm:?}");
    let stored = vm.spec.clone().unwrap_or_default();
    let mac = stored.nics[0].mac.clone();
    assert_eq!(mac, vmm_agent::nics::derived_mac("netvm", "eth0").to_string());
    assert!(mac.starts_with("02:"), "{mac}");
    assert_eq!(stored.nics[0].bridge, "anbr0", "the agent's --bridge is stored");
    assert_eq!((stored.nics[1].bridge.as_str(), stored.nics[1].mtu), ("", 0));
    let tap = agent_tap_name("netvm", "eth0");
    let shown: Vec<(&str, &str, &str, u32)> = vm
        .nic_taps
        .iter()
        .map(|t| (t.nic_id.as_str(), t.tap.as_str(), t.bridge.as_str(), t.mtu))
        .collect();
    assert_eq!(
        shown,
        [("eth0", tap.as_str(), "anbr0", 1400), ("eth1", "antap0", "", 0)]
    );
    let described = link(&ns, &tap).unwrap_or_default();
    assert!(described.contains("master anbr0"), "{described}");
    assert!(described.contains("mtu 1400"), "{described}");
    assert!(
        described.contains("state UP") || described.contains(",UP"),
        "{described}"
    );
    assert!(described.contains("tun type tap"), "{described}");

    wait_console(&mut vms, "netvm", "BOOT-COMPLETE", BOOT_TIMEOUT).await?;
    // The probe's next action prints `idle` once both net-info lines are whole (waiting for
    // `mtu=` matched eth0's line while eth1's was still arriving).
    let console = wait_console(&mut vms, "netvm", "vmmprobe: idle", Duration::from_secs(60)).await?;
    let eth0 = probe_fields(&console, "net-info dev=eth0");
    assert_eq!(eth0["mac"], mac, "{console}");
    assert_eq!(eth0["ip"], "10.79.0.2", "{console}");
    let eth1 = probe_fields(&console, "net-info dev=eth1");
    assert_eq!(eth1["mac"], stored.nics[1].mac, "{console}");
    ns.ping("10.79.0.2", 5, 10)?;
    // A snapshot of the configured guest, restored below once this VM is gone.
    let channel = agent.channel().await?;
    let mut snaps = SnapshotServiceClient::new(channel.clone());
    snapshot_of(
        &mut snaps,
        &channel,
        create("netvm", "netsnap", SnapshotKind::Full),
    )
    .await?;
    wait_state(&mut vms, "netvm", VmState::Running, Duration::from_secs(10)).await?;

    // The tap lives exactly as long as the vmm.
    vms.stop_vm(StopVmRequest {
        vm_id: "netvm".into(),
        request_id: String::new(),
        timeout_ms: 0,
        force: true,
    })
    .await?;
    assert_eq!(link(&ns, &tap), None, "the tap outlived the stopped VM");
    let vm = vms
        .start_vm(StartVmRequest {
            vm_id: "netvm".into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(vm.state(), VmState::Running, "{vm:?}");
    let described = link(&ns, &tap).unwrap_or_default();
    assert!(
        described.contains("master anbr0") && described.contains("mtu 1400"),
        "{described}"
    );
    vms.delete_vm(DeleteVmRequest {
        vm_id: "netvm".into(),
        request_id: String::new(),
    })
    .await?;
    assert_eq!(link(&ns, &tap), None, "the tap outlived the deleted VM");
    assert!(agent_taps(&ns)?.is_empty());
    assert!(
        link(&ns, "antap0").is_some(),
        "the existing tap is not the agent's to remove"
    );

    // Restored as a new VM, eth0 gets a tap the agent makes for it on the same bridge with the
    // same MTU (eth1 is named onto the existing tap): the restored guest answers there at once.
    let mut request = restore("netsnap", "netclone", "antap0");
    request.nics[0].id = "eth1".into();
    let clone = restored(&mut snaps, &channel, request).await?;
    let clone = wait_state(&mut vms, &clone.vm_id, VmState::Running, Duration::from_secs(10)).await?;
    let clone_tap = agent_tap_name("netclone", "eth0");
    let shown: Vec<(&str, &str, &str, u32)> = clone
        .nic_taps
        .iter()
        .map(|t| (t.nic_id.as_str(), t.tap.as_str(), t.bridge.as_str(), t.mtu))
        .collect();
    assert_eq!(
        shown,
        [
            ("eth0", clone_tap.as_str(), "anbr0", 1400),
            ("eth1", "antap0", "", 0)
        ]
    );
    let described = link(&ns, &clone_tap).unwrap_or_default();
    assert!(
        described.contains("master anbr0") && described.contains("mtu 1400"),
        "{described}"
    );
    ns.ping("10.79.0.2", 5, 10)?;
    vms.delete_vm(DeleteVmRequest {
        vm_id: "netclone".into(),
        request_id: String::new(),
    })
    .await?;
    assert_eq!(link(&ns, &clone_tap), None, "the tap outlived the restored VM");
    assert!(agent_taps(&ns)?.is_empty());
    drop(agent);
    drop(ns);
    Ok(())
}

/// A spec whose vmm fails to boot (the kernel is no kernel) after its taps are made.
fn unbootable() -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: "/etc/hostname".into(),
        nics: vec![bridged("eth0", "", 0), bridged("eth1", "lkbr1", 1280)],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_made_taps_do_not_leak_across_create_delete_cycles() -> Result<()> {
    let ns = NetNs::new("agenttaps")?;
    ns.add_bridge("lkbr0", "10.79.2.1/24", &[])?;
    // A port's MTU lowers its bridge's: eth1's 1280 must not change what eth0 finds on lkbr0.
    ns.add_bridge("lkbr1", "10.79.3.1/24", &[])?;
    let dir = state_dir("agent-tap-churn")?;
    let agent = Agent::start_in(Some(ns.name()), dir.path(), &["--bridge", "lkbr0"])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    for i in 0..30 {
        let id = format!("leak{i}");
        vms.create_vm(CreateVmRequest {
            vm_id: id.clone(),
            spec: Some(unbootable()),
            request_id: String::new(),
        })
        .await?;
        let vm = wait_state(&mut vms, &id, VmState::Failed, Duration::from_secs(10)).await?;
        // The taps were made (and set up) before the vmm failed: their names are shown.
        let made: Vec<(&str, u32)> = vm.nic_taps.iter().map(|t| (t.tap.as_str(), t.mtu)).collect();
        let (eth0, eth1) = (agent_tap_name(&id, "eth0"), agent_tap_name(&id, "eth1"));
        assert_eq!(made, [(eth0.as_str(), 1500), (eth1.as_str(), 1280)], "{vm:?}");
        assert!(vm.state_reason.starts_with("cannot start"), "{vm:?}");
        assert!(agent_taps(&ns)?.is_empty(), "{id}: a failed VM left a tap");
        vms.delete_vm(DeleteVmRequest {
            vm_id: id,
            request_id: String::new(),
        })
        .await?;
    }
    assert!(agent_taps(&ns)?.is_empty());
    drop(agent);
    drop(ns);
    Ok(())
}
