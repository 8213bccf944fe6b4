//! The API's contract without booting real guests: exact status codes for every invalid field,
//! unknown ids and wrong states, RESOURCE_EXHAUSTED with nothing half made, a vmm that fails to
//! start, listing with selectors and pages, GetHost, reflection, vmmctl, and health reporting
//! NOT_SERVING while a VM is being re-adopted.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use common::{probe_spec, state_dir, wait_state, Agent};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use vmm_agent::proto::host_service_client::HostServiceClient;
use vmm_agent::proto::{
    CreateVmRequest, DeleteVmRequest, Disk, GetConsoleRequest, GetHostRequest, GetVmRequest, ListVmsRequest,
    PauseVmRequest, RebootVmRequest, ResumeVmRequest, StartVmRequest, StopVmRequest, Vm, VmSpec, VmState,
};
use vmm_agent::store::Store;

/// A file that exists but is no kernel: the vmm exits with a setup error at once.
fn junk_spec(labels: &[(&str, &str)]) -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: "/etc/hostname".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn create(vm_id: &str, spec: Option<VmSpec>) -> CreateVmRequest {
    CreateVmRequest {
        vm_id: vm_id.into(),
        spec,
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_listing_and_host() -> Result<()> {
    let dir = state_dir("agent-api")?;
    // Two allocatable vCPUs on this 2-CPU host, and a label for GetHost.
    let agent = Agent::start(dir.path(), &["--vcpu-overcommit", "1", "--label", "zone=z1"])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let good = probe_spec("idle")?;
    let with = |f: &dyn Fn(&mut VmSpec)| {
        let mut s = good.clone();
        f(&mut s);
        Some(s)
    };
    let disk = |path: &str, root: bool| Disk {
        path: path.into(),
        read_only: true,
        root,
        ..Default::default()
    };
    let image = good.initrd.clone();
    let invalid: Vec<(CreateVmRequest, &str)> = vec![
        (create("", Some(good.clone())), "vm_id"),
        (create("Bad_Id", Some(good.clone())), "vm_id"),
        (create(&"x".repeat(64), Some(good.clone())), "vm_id"),
        (create("ok", None), "spec"),
        (create("ok", with(&|s| s.vcpus = 0)), "spec.vcpus"),
        (create("ok", with(&|s| s.vcpus = 33)), "spec.vcpus"),
        (create("ok", with(&|s| s.memory_mib = 8)), "spec.memory_mib"),
        (
            create("ok", with(&|s| s.memory_mib = u64::MAX)),
            "spec.memory_mib",
        ),
        (create("ok", with(&|s| s.kernel.clear())), "spec.kernel"),
        (
            create("ok", with(&|s| s.kernel = "vmlinux".into())),
            "spec.kernel",
        ),
        (
            create("ok", with(&|s| s.kernel = "/no/such/vmlinux".into())),
            "spec.kernel",
        ),
        (create("ok", with(&|s| s.kernel = "/tmp".into())), "spec.kernel"),
        (
            create("ok", with(&|s| s.initrd = "/no/such/initrd".into())),
            "spec.initrd",
        ),
        (create("ok", with(&|s| s.cmdline = "a\nb".into())), "spec.cmdline"),
        (
            create("ok", with(&|s| s.cmdline = "x".repeat(5000))),
            "spec.cmdline",
        ),
        (
            create("ok", with(&|s| s.disks = vec![disk("/no/such/disk", false)])),
            "spec.disks[0].path",
        ),
        (
            create(
                "ok",
                with(&|s| s.disks = vec![disk(&image, true), disk(&image, true)]),
            ),
            "spec.disks",
        ),
        (
            create("ok", with(&|s| s.disks = vec![disk(&image, false); 17])),
            "spec.disks",
        ),
        (
            create(
                "ok",
                with(&|s| s.labels = HashMap::from([("bad key".into(), "v".into())])),
            ),
            "spec.labels",
        ),
        (
            create(
                "ok",
                with(&|s| s.labels = HashMap::from([("k".into(), "bad value".into())])),
            ),
            "spec.labels",
        ),
        (
            CreateVmRequest {
                request_id: "has space".into(),
                ..create("ok", Some(good.clone()))
            },
            "request_id",
        ),
    ];
    for (request, field) in invalid {
        let err = vms.create_vm(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{request:?}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:"))
                || err.message().starts_with(&format!("{field}[")),
            "{field}: {}",
            err.message()
        );
    }

    // The host cannot fit these; nothing is left of them.
    for (id, spec) in [
        ("huge-mem", with(&|s| s.memory_mib = 1 << 30)),
        ("many-cpus", with(&|s| s.vcpus = 3)),
    ] {
        let err = vms.create_vm(create(id, spec)).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        let gone = vms.get_vm(GetVmRequest { vm_id: id.into() }).await.unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
    }

    // Unknown ids.
    let id = || "nobody".to_string();
    let codes = [
        vms.get_vm(GetVmRequest { vm_id: id() }).await.map(|_| ()),
        vms.start_vm(StartVmRequest {
            vm_id: id(),
            request_id: String::new(),
        })
        .await
        .map(|_| ()),
        vms.stop_vm(StopVmRequest {
            vm_id: id(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        vms.pause_vm(PauseVmRequest {
            vm_id: id(),
            request_id: String::new(),
        })
        .await
        .map(|_| ()),
        vms.resume_vm(ResumeVmRequest {
            vm_id: id(),
            request_id: String::new(),
        })
        .await
        .map(|_| ()),
        vms.reboot_vm(RebootVmRequest {
            vm_id: id(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        vms.delete_vm(DeleteVmRequest {
            vm_id: id(),
            request_id: String::new(),
        })
        .await
        .map(|_| ()),
        vms.get_console(GetConsoleRequest {
            vm_id: id(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ];
    for result in codes {
        assert_eq!(result.unwrap_err().code(), Code::NotFound);
    }

    // A vmm that cannot boot its kernel: the VM exists, FAILED, with the vmm's reason.
    let mut failed: Vec<Vm> = Vec::new();
    for (i, labels) in [
        [("app", "web"), ("tier", "a")],
        [("app", "web"), ("tier", "b")],
        [("app", "db"), ("tier", "a")],
    ]
    .iter()
    .enumerate()
    {
        let vm = vms
            .create_vm(create(&format!("junk-{i}"), Some(junk_spec(labels))))
            .await?
            .into_inner();
        failed.push(vm);
    }
    let vm = wait_state(&mut vms, "junk-0", VmState::Failed, Duration::from_secs(10)).await?;
    assert_eq!((vm.pid, vm.exit_code), (0, Some(1)), "{vm:?}");
    assert!(!vm.state_reason.is_empty());
    for id in ["junk-1", "junk-2"] {
        wait_state(&mut vms, id, VmState::Failed, Duration::from_secs(10)).await?;
    }
    // Wrong states.
    let junk = || "junk-0".to_string();
    for result in [
        vms.pause_vm(PauseVmRequest {
            vm_id: junk(),
            request_id: String::new(),
        })
        .await,
        vms.resume_vm(ResumeVmRequest {
            vm_id: junk(),
            request_id: String::new(),
        })
        .await,
        vms.reboot_vm(RebootVmRequest {
            vm_id: junk(),
            ..Default::default()
        })
        .await,
    ] {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("failed"), "{}", err.message());
    }
    let err = vms
        .stop_vm(StopVmRequest {
            vm_id: junk(),
            timeout_ms: 3_600_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("timeout_ms"));
    // Stopping a VM that does not run is a no-op; starting a failed one tries again.
    let stopped = vms
        .stop_vm(StopVmRequest {
            vm_id: junk(),
            ..Default::default()
        })
        .await?;
    assert_eq!(stopped.get_ref().state(), VmState::Failed);
    let again = vms
        .start_vm(StartVmRequest {
            vm_id: junk(),
            request_id: "start-junk".into(),
        })
        .await?
        .into_inner();
    assert_eq!(again.state(), VmState::Failed);
    let replay = vms
        .start_vm(StartVmRequest {
            vm_id: junk(),
            request_id: "start-junk".into(),
        })
        .await?
        .into_inner();
    assert_eq!(replay, again, "a retried start answers the first result");

    // Listing: selectors, state filters, pages.
    let list = |selector: &str, states: Vec<VmState>, page_size: u32, page_token: String| ListVmsRequest {
        label_selector: selector.into(),
        states: states.into_iter().map(|s| s as i32).collect(),
        page_size,
        page_token,
    };
    let ids = |vms: &[Vm]| vms.iter().map(|v| v.vm_id.clone()).collect::<Vec<_>>();
    let all = vms
        .list_vms(list("", vec![], 0, String::new()))
        .await?
        .into_inner();
    assert_eq!(ids(&all.vms), ["junk-0", "junk-1", "junk-2"]);
    let web = vms
        .list_vms(list("app=web", vec![], 0, String::new()))
        .await?
        .into_inner();
    assert_eq!(ids(&web.vms), ["junk-0", "junk-1"]);
    let sel = vms
        .list_vms(list("app!=web,tier", vec![VmState::Failed], 0, String::new()))
        .await?
        .into_inner();
    assert_eq!(ids(&sel.vms), ["junk-2"]);
    let none = vms
        .list_vms(list("", vec![VmState::Running], 0, String::new()))
        .await?
        .into_inner();
    assert!(none.vms.is_empty());
    let page1 = vms
        .list_vms(list("", vec![], 2, String::new()))
        .await?
        .into_inner();
    assert_eq!(ids(&page1.vms), ["junk-0", "junk-1"]);
    let page2 = vms
        .list_vms(list("", vec![], 2, page1.next_page_token.clone()))
        .await?
        .into_inner();
    assert_eq!(ids(&page2.vms), ["junk-2"]);
    assert!(page2.next_page_token.is_empty());
    for (request, field) in [
        (list("a b", vec![], 0, String::new()), "label_selector"),
        (list("", vec![], 0, "garbage".into()), "page_token"),
        (
            ListVmsRequest {
                states: vec![99],
                ..Default::default()
            },
            "states[0]",
        ),
    ] {
        let err = vms.list_vms(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }

    // GetHost: the flags' allocatable vCPUs, the operator label, VMs by state.
    let host = HostServiceClient::new(agent.channel().await?)
        .get_host(GetHostRequest {})
        .await?
        .into_inner();
    assert_eq!(host.allocatable_vcpus, host.cpus);
    assert_eq!(host.labels.get("zone").map(String::as_str), Some("z1"));
    assert_eq!(host.allocated_vcpus, 0, "failed VMs hold nothing");
    let failed_count = host
        .vms_by_state
        .iter()
        .find(|c| c.state() == VmState::Failed)
        .map(|c| c.count);
    assert_eq!(failed_count, Some(3));
    assert!(host.vmm_version.starts_with("vmm "), "{}", host.vmm_version);

    // Reflection lists the services, so stock tools work.
    let services = reflection_services(&agent).await?;
    for name in [
        "vmmagent.v1.VmService",
        "vmmagent.v1.HostService",
        "vmmagent.v1.SnapshotService",
        "vmmagent.v1.ImageService",
        "vmmagent.v1.OperationsService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|s| s == name), "{services:?}");
    }

    // vmmctl speaks the same API.
    let out = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("--endpoint")
        .arg(format!("unix:{}", agent.socket.display()))
        .args(["--json", "list", "--selector", "tier=a"])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<&str> = listed["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["vm_id"].as_str())
        .collect();
    assert_eq!(names, ["junk-0", "junk-2"]);
    assert_eq!(listed["vms"][0]["state"], "failed");
    let out = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("--endpoint")
        .arg(format!("unix:{}", agent.socket.display()))
        .args(["pause", "junk-1"])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Deletes: a retried one answers OK again; its request id on another VM is refused.
    let del = |vm_id: &str, request_id: &str| DeleteVmRequest {
        vm_id: vm_id.into(),
        request_id: request_id.into(),
    };
    vms.delete_vm(del("junk-0", "del-0")).await?;
    vms.delete_vm(del("junk-0", "del-0")).await?;
    let err = vms.delete_vm(del("junk-1", "del-0")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for vm in &failed[1..] {
        vms.delete_vm(del(&vm.vm_id, "")).await?;
    }
    let err = vms.delete_vm(del("junk-1", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    Ok(())
}

async fn reflection_services(agent: &Agent) -> Result<Vec<String>> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut client = ServerReflectionClient::new(agent.channel().await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let mut names = Vec::new();
    if let Some(response) = stream.message().await? {
        if let Some(MessageResponse::ListServicesResponse(list)) = response.message_response {
            names = list.service.into_iter().map(|s| s.name).collect();
        }
    }
    Ok(names)
}

/// A stored running VM whose "vmm" (a shell named after its socket) never answers: the agent
/// reports NOT_SERVING while it tries, then SERVING, with the VM stopped and the impostor killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_readopting() -> Result<()> {
    let dir = state_dir("agent-health")?;
    let vm_dir = dir.path().join("vms").join("ghost");
    std::fs::create_dir_all(&vm_dir)?;
    let sock = vm_dir.join("api.sock");
    // Accepts connections (the backlog) but never answers.
    let _listener = std::os::unix::net::UnixListener::bind(&sock)?;
    // `read` is a shell builtin, so the shell stays with the socket path in its command line.
    let mut ghost = Command::new("sh")
        .arg("-c")
        .arg("read x")
        .arg(&sock)
        .stdin(Stdio::piped())
        .spawn()?;
    let mut store = Store::open(&dir.path().join("state.db"))?;
    store.create_vm(
        Vm {
            vm_id: "ghost".into(),
            spec: Some(junk_spec(&[])),
            state: VmState::Running as i32,
            pid: ghost.id(),
            ..Default::default()
        },
        None,
        None,
    )?;
    drop(store);

    let agent = Agent::start(dir.path(), &["--adopt-timeout-ms", "3000"])?;
    let status = agent.health().await?;
    assert_eq!(status, ServingStatus::NotServing);
    let mut vms = agent.vms().await?;
    let err = vms
        .get_vm(GetVmRequest {
            vm_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    agent.wait_serving().await?;
    let vm = vms
        .get_vm(GetVmRequest {
            vm_id: "ghost".into(),
        })
        .await?
        .into_inner();
    assert_eq!((vm.state(), vm.pid), (VmState::Stopped, 0), "{vm:?}");
    assert!(vm.state_reason.contains("control socket"), "{}", vm.state_reason);
    let status = ghost.wait()?;
    assert!(!status.success(), "the impostor was killed: {status:?}");
    Ok(())
}
