//! The Prometheus endpoint (`--metrics-listen`) of a real agent, scraped over real TCP on
//! 127.0.0.1: VMs by state, the RPCs made, start-to-running and start-to-boot-complete samples,
//! the CPU, memory and disk figures of one real guest with a disk, and the start admission limit
//! (two starts wait for the one boot slot that guest holds; one is withdrawn by a stop); then
//! requests that are not scrapes (wrong path or method, garbage, an oversized head, clients that send nothing) get their
//! statuses and the endpoint and the agent keep serving; the address from the config file or,
//! overriding it, the flag.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use common::{probe_spec, state_dir, wait_console, Agent, BOOT_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use vmm_agent::proto::{
    CreateVmRequest, DeleteVmRequest, Disk, GetVmRequest, PauseVmRequest, StopVmRequest, Vm, VmSpec, VmState,
};

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_agent(dir: &std::path::Path, port: u16) -> Result<Agent> {
    Agent::start(dir, &["--metrics-listen", &format!("127.0.0.1:{port}")])
}

/// Sends `request` as is on a new connection and returns everything the server sends back
/// before it closes (or resets) the connection.
async fn exchange(port: u16, request: &[u8]) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    // The server may answer and close before it has read all of an oversized request.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    });
    read.await
        .context("the metrics server did not close the connection")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The status code of an HTTP/1.1 answer.
fn status_of(answer: &str) -> Result<u16> {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP/1.1 answer: {answer:?}"))
}

/// `GET /metrics`: the samples, by series (`name{labels}`), checked to be a 200 in the text format.
async fn scrape(port: u16) -> Result<BTreeMap<String, f64>> {
    let answer = exchange(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n",
    )
    .await?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of head in {answer:?}"))?;
    if status_of(head)? != 200 {
        bail!("scrape answered {head}");
    }
    let head = head.to_ascii_lowercase();
    if !head.contains("content-type: text/plain; version=0.0.4") {
        bail!("not the text format: {head}");
    }
    let mut samples = BTreeMap::new();
    for line in body.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow!("bad line {line:?}"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().with_context(|| format!("bad value in {line:?}"))?,
        };
        samples.insert(series.to_string(), value);
    }
    Ok(samples)
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    samples
        .get(series)
        .copied()
        .ok_or_else(|| anyhow!("no {series} in {samples:#?}"))
}

/// Every `vmmagent_vms` state with its count.
fn by_state(samples: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter_map(|(k, v)| {
            let state = k.strip_prefix("vmmagent_vms{state=\"")?.strip_suffix("\"}")?;
            Some((state.to_string(), *v))
        })
        .collect()
}

fn states(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    let mut all: BTreeMap<String, f64> = ["starting", "running", "paused", "stopping", "stopped", "failed"]
        .into_iter()
        .map(|s| (s.to_string(), 0.0))
        .collect();
    for (state, n) in pairs {
        all.insert(state.to_string(), *n);
    }
    all
}

fn rpc(method: &str, code: &str) -> String {
    format!("vmmagent_rpc_requests_total{{method=\"/vmmagent.v1.VmService/{method}\",code=\"{code}\"}}")
}

/// Polls GetVm until the VM exists with `text` in its state reason.
async fn wait_reason(
    vms: &mut vmm_agent::proto::vm_service_client::VmServiceClient<tonic::transport::Channel>,
    vm_id: &str,
    text: &str,
) -> Result<Vm> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = vms.get_vm(GetVmRequest { vm_id: vm_id.into() }).await;
        if let Ok(vm) = &found {
            if vm.get_ref().state_reason.contains(text) {
                return Ok(found?.into_inner());
            }
        }
        if Instant::now() > deadline {
            bail!("{vm_id} never had '{text}' in its state reason: {found:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Scrapes until `ready` holds for the samples (figures the agent records as events arrive).
async fn scrape_until(
    port: u16,
    what: &str,
    ready: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> Result<BTreeMap<String, f64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let samples = scrape(port).await?;
        if ready(&samples) {
            return Ok(samples);
        }
        if Instant::now() > deadline {
            bail!("never saw {what} in {samples:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_show_vm_states_rpcs_start_latency_and_guest_usage() -> Result<()> {
    harness::require_kvm();
    let dir = state_dir("agent-met")?;
    let image = dir.path().join("data.img");
    std::fs::write(&image, vec![0u8; 1 << 20])?;
    let port = free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let agent = Agent::start(
        dir.path(),
        &["--metrics-listen", &metrics, "--max-concurrent-boots", "1"],
    )?;
    agent.wait_serving().await?;

    let empty = scrape(port).await?;
    assert_eq!(by_state(&empty), states(&[]), "every state at 0");
    assert_eq!(value(&empty, "vmmagent_vm_start_to_running_seconds_count")?, 0.0);

    let mut vms = agent.vms().await?;
    // One guest that boots and reads its disk; one VM whose "kernel" is not one, so that its
    // vmm fails at once (FAILED, no second guest to boot).
    let mut spec = probe_spec("blk-read:vda:0:65536,idle")?;
    spec.disks = vec![Disk {
        path: image.display().to_string(),
        read_only: false,
        root: false,
        ..Default::default()
    }];
    let vm = vms
        .create_vm(CreateVmRequest {
            vm_id: "meter".into(),
            spec: Some(spec.clone()),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(vm.state(), VmState::Running, "{vm:?}");

    // One boot slot (--max-concurrent-boots 1), held by "meter" until its guest reports its boot
    // complete: the next starts wait in line, STARTING without a vmm.
    let mut broken = spec.clone();
    broken.kernel = image.display().to_string();
    broken.disks.clear();
    let client = vms.clone();
    let create = |id: &str, spec: VmSpec| {
        let mut vms = client.clone();
        let request = CreateVmRequest {
            vm_id: id.into(),
            spec: Some(spec),
            request_id: String::new(),
        };
        tokio::spawn(async move { vms.create_vm(request).await })
    };
    let broken_create = create("broken", broken);
    let waiting = wait_reason(&mut vms, "broken", "waiting for a boot slot").await?;
    assert_eq!(
        (waiting.state(), waiting.pid),
        (VmState::Starting, 0),
        "{waiting:?}"
    );
    let queued_create = create("queued", spec.clone());
    wait_reason(&mut vms, "queued", "waiting for a boot slot").await?;
    let samples = scrape(port).await?;
    assert_eq!(value(&samples, "vmmagent_boots_max")?, 1.0);
    assert_eq!(value(&samples, "vmmagent_boots_in_flight")?, 1.0);
    assert_eq!(value(&samples, "vmmagent_boots_waiting")?, 2.0);
    // A stop ends a wait: that VM never boots, and the create that was waiting is ABORTED.
    let stopped = vms
        .stop_vm(StopVmRequest {
            vm_id: "queued".into(),
            request_id: String::new(),
            timeout_ms: 0,
            force: false,
        })
        .await?
        .into_inner();
    assert_eq!(
        (stopped.state(), stopped.pid),
        (VmState::Stopped, 0),
        "{stopped:?}"
    );
    let aborted = queued_create.await?.expect_err("a withdrawn start");
    assert_eq!(aborted.code(), Code::Aborted, "{aborted:?}");
    vms.delete_vm(DeleteVmRequest {
        vm_id: "queued".into(),
        request_id: String::new(),
    })
    .await?;
    // The boot of "meter" completes and frees the slot; "broken" takes it and fails at once
    // (its kernel is not one), which frees it again.
    let failed = broken_create.await??.into_inner();
    assert_eq!(failed.state(), VmState::Failed, "{failed:?}");
    let err = vms
        .get_vm(GetVmRequest { vm_id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    wait_console(&mut vms, "meter", "vmmprobe: idle", BOOT_TIMEOUT).await?;

    // The boot-complete event reaches the agent on its own path: wait for its sample.
    let samples = scrape_until(port, "a boot-complete sample", |s| {
        s.get("vmmagent_vm_start_to_boot_complete_seconds_count") == Some(&1.0)
    })
    .await?;
    assert_eq!(by_state(&samples), states(&[("running", 1.0), ("failed", 1.0)]));
    assert_eq!(value(&samples, &rpc("CreateVm", "OK"))?, 2.0);
    assert_eq!(value(&samples, &rpc("CreateVm", "ABORTED"))?, 1.0);
    assert_eq!(value(&samples, "vmmagent_boots_in_flight")?, 0.0);
    assert_eq!(value(&samples, "vmmagent_boots_waiting")?, 0.0);
    // "nope", and polls for the waiting VMs before their creates stored them.
    assert!(value(&samples, &rpc("GetVm", "NOT_FOUND"))? >= 1.0);
    assert!(
        value(
            &samples,
            "vmmagent_rpc_requests_total{method=\"/grpc.health.v1.Health/Check\",code=\"OK\"}"
        )? >= 1.0
    );
    let create_latency =
        "vmmagent_rpc_duration_seconds_count{method=\"/vmmagent.v1.VmService/CreateVm\",code=\"OK\"}";
    assert_eq!(value(&samples, create_latency)?, 2.0);
    // Only the VM that ran counts toward start-to-running.
    assert_eq!(
        value(&samples, "vmmagent_vm_start_to_running_seconds_count")?,
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "vmmagent_vm_start_to_running_seconds_bucket{le=\"+Inf\"}"
        )?,
        1.0
    );
    assert!(value(&samples, "vmmagent_vm_start_to_boot_complete_seconds_sum")? > 0.0);
    assert!(value(&samples, "vmmagent_vm_cpu_seconds_total{vm_id=\"meter\"}")? > 0.0);
    assert!(value(&samples, "vmmagent_vm_resident_memory_bytes{vm_id=\"meter\"}")? > 0.0);
    let read = value(
        &samples,
        "vmmagent_vm_disk_read_bytes_total{vm_id=\"meter\",drive=\"disk0\"}",
    )?;
    assert!(read >= 65536.0, "the probe read 64 KiB of its disk: {read}");
    assert!(
        !samples.keys().any(|k| k.contains("vm_id=\"broken\"")),
        "a VM without a vmm has no usage"
    );
    assert_eq!(
        value(&samples, "vmmagent_host_allocated_memory_bytes")?,
        128.0 * 1024.0 * 1024.0
    );
    assert_eq!(value(&samples, "vmmagent_host_allocated_vcpus")?, 1.0);

    vms.pause_vm(PauseVmRequest {
        vm_id: "meter".into(),
        request_id: String::new(),
    })
    .await?;
    let samples = scrape(port).await?;
    assert_eq!(by_state(&samples), states(&[("paused", 1.0), ("failed", 1.0)]));
    assert_eq!(value(&samples, &rpc("PauseVm", "OK"))?, 1.0);
    // A paused VM is still metered.
    assert!(value(&samples, "vmmagent_vm_cpu_seconds_total{vm_id=\"meter\"}")? > 0.0);
    assert!(
        value(
            &samples,
            "vmmagent_vm_disk_read_bytes_total{vm_id=\"meter\",drive=\"disk0\"}"
        )? >= read
    );
    assert_eq!(
        value(&samples, "vmmagent_scrape_errors_total{reason=\"control\"}")?,
        0.0
    );

    for id in ["meter", "broken"] {
        vms.delete_vm(DeleteVmRequest {
            vm_id: id.into(),
            request_id: String::new(),
        })
        .await?;
    }
    let samples = scrape(port).await?;
    assert_eq!(by_state(&samples), states(&[]));
    assert_eq!(value(&samples, &rpc("DeleteVm", "OK"))?, 3.0);
    assert_eq!(value(&samples, "vmmagent_boots_in_flight")?, 0.0);
    assert!(
        !samples.keys().any(|k| k.contains("vm_id=")),
        "no usage of deleted VMs"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_scrapes_get_their_status_and_the_agent_serves_on() -> Result<()> {
    let dir = state_dir("agent-mhttp")?;
    let port = free_port()?;
    let agent = start_agent(dir.path(), port)?;
    agent.wait_serving().await?;

    let answer = exchange(port, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert_eq!(status_of(&answer)?, 404, "{answer}");
    let answer = exchange(
        port,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await?;
    assert_eq!(status_of(&answer)?, 405, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("allow: get, head"),
        "{answer}"
    );
    let answer = exchange(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await?;
    assert_eq!(status_of(&answer)?, 400, "{answer}");
    let mut oversized = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    oversized.extend(std::iter::repeat_n(b'a', 64 * 1024));
    oversized.extend_from_slice(b"\r\n\r\n");
    let answer = exchange(port, &oversized).await?;
    assert_eq!(status_of(&answer)?, 431, "{answer}");
    let answer = exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert_eq!(status_of(&answer)?, 200, "{answer}");
    assert!(!answer.contains("vmmagent_vms"), "HEAD has no body: {answer}");

    // More clients than the server takes at once connect and send nothing: each is dropped after
    // the header timeout, and a scrape that came after them is served once they are.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).await?);
    }
    let samples = scrape(port).await?;
    assert_eq!(by_state(&samples), states(&[]));
    drop(silent);

    // The agent itself never noticed.
    agent.wait_serving().await?;
    let samples = scrape(port).await?;
    assert!(
        value(
            &samples,
            "vmmagent_rpc_requests_total{method=\"/grpc.health.v1.Health/Check\",code=\"OK\"}"
        )? >= 2.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_comes_from_the_config_file_unless_a_flag_gives_one() -> Result<()> {
    let dir = state_dir("agent-mconf")?;
    let (file_port, flag_port) = (free_port()?, free_port()?);
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("metrics_listen = \"127.0.0.1:{file_port}\"\n"))?;
    let config_arg = config.display().to_string();
    let agent = Agent::start(dir.path(), &["--config", &config_arg])?;
    agent.wait_serving().await?;
    scrape(file_port).await?;
    drop(agent);

    let flag = format!("127.0.0.1:{flag_port}");
    let agent = Agent::start(dir.path(), &["--config", &config_arg, "--metrics-listen", &flag])?;
    agent.wait_serving().await?;
    scrape(flag_port).await?;
    assert!(
        TcpStream::connect(("127.0.0.1", file_port)).await.is_err(),
        "the flag replaces the file's address"
    );
    drop(agent);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-agent"))
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--vmm-bin")
        .arg(harness::vmm_binary())
        .args(["--metrics-listen", "no-port-here"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--metrics-listen 'no-port-here'"), "{stderr}");
    Ok(())
}
