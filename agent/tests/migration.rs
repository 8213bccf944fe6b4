//! Live migration between two agents as two hosts: each agent runs in its own network namespace
//! with a TLS listener (certificates naming the `migration-peer` role, from a CA made here) and a
//! tap on a local bridge; the hosts and a third namespace, the client, share one L2 segment. The
//! source agent jails its vmms (`--jail-vms`), so the VM moves out of a jail. A
//! real guest with two disks counts in memory, keeps rewriting and checking a buffer and the
//! start of its second disk, and runs a TCP echo server; the client keeps one TCP connection to it
//! open through everything below.
//!
//! Refused without touching the VM: a destination with too little memory (before any copy),
//! PrepareIncoming from a certificate without the peer role or from another CA, mutating calls
//! while it migrates. A migration cancelled mid-way and one whose destination vmm is killed
//! mid-way both leave the VM running at the source and nothing at the destination, and so does
//! one whose source agent is killed mid-way and restarted (it cancels what its vmm still sends). Then
//! `vmmctl migrate` moves it: the destination runs it (the counter goes on, no boot), the
//! source has neither record nor process, the disk image is unchanged, the buffer the guest keeps
//! rewriting and checking has no stale or damaged page (nor the disk a stale block), the jail is
//! gone and the disk root's again, and the client's connection survived; its longest gap between
//! echoes is the client-view downtime.
//! Finally it moves back without shared storage: the agents copy its disks into the new host's VM
//! directory while it writes them, and the copy of the disk it no longer writes is identical. The
//! sending agent is killed mid-way; restarted, it neither starts its old copy nor lets anyone. A,
//! which jails its vmms, receives it in a jail: the disk copies go to the jailed vmm as
//! descriptors.

mod common;

use std::net::TcpStream;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use common::{
    probe_counters, probe_spec, state_dir, vmm_processes_under, wait_console, wait_state, write, Agent, Ca,
    BOOT_TIMEOUT,
};
use harness::NetNs;
use rcgen::SanType;
use tonic::transport::Channel;
use tonic::Code;
use vmm_agent::client::{connect, ClientTls};
use vmm_agent::proto::migration_peer_service_client::MigrationPeerServiceClient;
use vmm_agent::proto::migration_service_client::MigrationServiceClient;
use vmm_agent::proto::operations_service_client::OperationsServiceClient;
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{
    operation, CancelMigrationRequest, CreateVmRequest, DeleteVmRequest, Disk, GetVmRequest, ListVmsRequest,
    MigrateVmRequest, MigrationPhase, NicSpec, Operation, PauseVmRequest, PrepareIncomingRequest,
    StartVmRequest, VmState, WaitOperationRequest, WatchMigrationRequest,
};

const GUEST_IP: &str = "10.83.0.50";
const HOST_A: &str = "10.83.0.11";
const HOST_B: &str = "10.83.0.12";
const CLIENT: &str = "10.83.0.3";
const PORT: u16 = 7443;
/// A port of host B's namespace with an agent that has almost no memory to give.
const SMALL_PORT: u16 = 7444;
const TAP: &str = "mtap0";
/// The source agent's flags: it jails its vmms.
const JAILED: &[&str] = &["--jail-vms"];
const ECHO_PORT: u16 = 7;

/// The segment: namespace `lan` holds bridge br0; each host has a bridge with its uplink and its
/// tap, and its address on that bridge; the client has an address on its uplink.
struct Segment {
    lan: NetNs,
    a: NetNs,
    b: NetNs,
    client: NetNs,
}

fn segment() -> Result<Segment> {
    let s = Segment {
        lan: NetNs::new("miglan")?,
        a: NetNs::new("miga")?,
        b: NetNs::new("migb")?,
        client: NetNs::new("migc")?,
    };
    s.lan.ip(&["link", "add", "br0", "type", "bridge"])?;
    s.lan.ip(&["link", "set", "br0", "up"])?;
    let uplink = |ns: &NetNs, name: &str| -> Result<()> {
        let peer = format!("lan-{name}");
        ns.ip(&[
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            s.lan.name(),
        ])?;
        s.lan.ip(&["link", "set", &peer, "master", "br0"])?;
        s.lan.ip(&["link", "set", &peer, "up"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.ip(&["link", "set", "uplink", "up"]).map(drop)
    };
    for (ns, name, ip) in [(&s.a, "a", HOST_A), (&s.b, "b", HOST_B)] {
        uplink(ns, name)?;
        ns.ip(&["link", "add", "brh", "type", "bridge"])?;
        ns.ip(&["link", "set", "uplink", "master", "brh"])?;
        ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ns.ip(&["link", "set", TAP, "master", "brh"])?;
        ns.ip(&["link", "set", TAP, "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "brh"])?;
        ns.ip(&["link", "set", "brh", "up"])?;
    }
    uplink(&s.client, "c")?;
    s.client
        .ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "uplink"])?;
    Ok(s)
}

/// An agent in `ns` on its Unix socket and on TLS at `ip:port`, with a certificate for `ip` that
/// names the peer role.
fn agent(
    ns: &NetNs,
    ca: &Ca,
    tag: &str,
    ip: &str,
    port: u16,
    extra: &[&str],
) -> Result<(Agent, common::StateDir)> {
    let dir = state_dir(tag)?;
    let (cert, key) = ca.leaf(vec![
        SanType::IpAddress(ip.parse()?),
        SanType::URI("vmmagent-role:migration-peer".try_into()?),
    ])?;
    write(dir.path(), "agent.pem", &cert)?;
    write(dir.path(), "agent.key", &key)?;
    write(dir.path(), "ca.pem", &ca.pem)?;
    let agent = restart(ns, dir.path(), ip, port, extra)?;
    Ok((agent, dir))
}

/// Starts the agent of `state_dir` (made by [`agent`], with its certificates) in `ns`.
fn restart(ns: &NetNs, state_dir: &Path, ip: &str, port: u16, extra: &[&str]) -> Result<Agent> {
    let file = |name: &str| state_dir.join(name).display().to_string();
    let (cert, key, ca_file) = (file("agent.pem"), file("agent.key"), file("ca.pem"));
    let listen = format!("tcp://{ip}:{port}");
    let mut args = vec![
        "--listen",
        &listen,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca_file,
    ];
    args.extend_from_slice(extra);
    Agent::start_in(Some(ns.name()), state_dir, &args)
}

/// What the client saw of its connection.
#[derive(Debug)]
struct Echoes {
    round_trips: u64,
    longest_gap: Duration,
}

/// Keeps one TCP connection to the guest's echo server, sending a numbered line and checking its
/// echo every 20 ms, until `stop`; fails if the connection breaks or an echo is wrong.
fn echo_client(ns: &NetNs, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<Result<Echoes>>> {
    use std::io::{Read, Write};
    ns.spawn(move || {
        let addr = format!("{GUEST_IP}:{ECHO_PORT}").parse()?;
        let mut conn =
            TcpStream::connect_timeout(&addr, Duration::from_secs(30)).context("connect to the guest")?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut echoes = Echoes {
            round_trips: 0,
            longest_gap: Duration::ZERO,
        };
        let mut last = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let line = format!("echo {:012}\n", echoes.round_trips);
            conn.write_all(line.as_bytes()).context("send")?;
            let mut back = vec![0u8; line.len()];
            conn.read_exact(&mut back).context("receive")?;
            ensure!(
                back == line.as_bytes(),
                "echo {:?} for {line:?}",
                String::from_utf8_lossy(&back)
            );
            echoes.round_trips += 1;
            echoes.longest_gap = echoes.longest_gap.max(last.elapsed());
            last = Instant::now();
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(echoes)
    })
}

/// Runs `f` on a thread inside `ns` (its own runtime), so that its connections start there.
async fn in_namespace<F>(ns: &NetNs, f: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let thread = ns.spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f)
    })?;
    tokio::task::spawn_blocking(move || thread.join().map_err(|_| anyhow::anyhow!("thread panicked")))
        .await???;
    Ok(())
}

fn request(destination: &str, bandwidth: u64) -> MigrateVmRequest {
    MigrateVmRequest {
        vm_id: "mover".into(),
        destination: destination.into(),
        bandwidth_bytes_per_s: bandwidth,
        shared_storage: true,
        ..Default::default()
    }
}

async fn wait_done(channel: &Channel, op: Operation) -> Result<Operation> {
    let mut ops = OperationsServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut op = op;
    while !op.done {
        ensure!(Instant::now() < deadline, "{} did not end: {op:?}", op.name);
        op = ops
            .wait_operation(WaitOperationRequest {
                name: op.name.clone(),
                timeout_ms: 1000,
            })
            .await?
            .into_inner();
    }
    Ok(op)
}

fn error_code(op: &Operation) -> Option<Code> {
    match &op.result {
        Some(operation::Result::Error(e)) => Some(Code::from(e.code)),
        _ => None,
    }
}

/// Waits until the migration has sent some memory (it is in pre-copy, rate-limited).
async fn wait_copying(migrations: &mut MigrationServiceClient<Channel>, source_dir: &Path) -> Result<()> {
    let mut stream = migrations
        .watch_migration(WatchMigrationRequest {
            vm_id: "mover".into(),
        })
        .await?
        .into_inner();
    while let Some(p) = stream.message().await? {
        if p.phase() == MigrationPhase::PreCopy && p.memory_transferred_bytes > 0 {
            return Ok(());
        }
        ensure!(
            p.phase() != MigrationPhase::Failed,
            "failed early: {p:?}\nthe source vmm's log:\n{}",
            std::fs::read_to_string(source_dir.join("vms/mover/vmm.log")).unwrap_or_default()
        );
    }
    bail!("the watch ended before any memory was sent")
}

/// The destination ends up with no VM and no vmm.
async fn nothing_left(vms: &mut VmServiceClient<Channel>, state_dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let listed = vms.list_vms(ListVmsRequest::default()).await?.into_inner().vms;
        let procs = vmm_processes_under(state_dir);
        if listed.is_empty() && procs.is_empty() && !state_dir.join("vms/mover").exists() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the destination kept {listed:?}, vmms {procs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sha256(path: &Path) -> Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or("")
        .to_string())
}

/// The lines of the guest's buffer and disk checks (mem-dirty, blk-dirty) that report a problem.
fn failed_checks(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| l.contains("vmmprobe: mem-dirty") || l.contains("vmmprobe: blk-dirty"))
        .filter(|l| !l.contains("errors=0") && !l.contains("started"))
        .collect()
}

/// Runs `vmmctl --json migrate VM --to TO [ARGS...]` against `from` and returns its last progress
/// line, which must say the migration completed.
fn vmmctl_migrate(
    from: &Agent,
    to: &Agent,
    vm_id: &str,
    endpoint: &str,
    args: &[&str],
) -> Result<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .args(["--endpoint", &format!("unix:{}", from.socket.display())])
        .args(["--json", "migrate", vm_id, "--to", endpoint])
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "vmmctl migrate failed: {stdout}{}\nsource agent:\n{}\ndestination agent:\n{}",
        String::from_utf8_lossy(&out.stderr),
        from.log(),
        to.log()
    );
    let last: serde_json::Value = serde_json::from_str(stdout.trim())?;
    ensure!(last["phase"] == "completed", "{last}");
    ensure!(last["memory_transferred_bytes"].as_u64() > Some(0), "{last}");
    Ok(last)
}

/// Waits until the VM's console shows the counter at `from + 20` (it goes on, no boot) and then a
/// few more rounds of its buffer and disk checks, all clean; returns the last counter value seen.
async fn runs_on_with_clean_checks(
    vms: &mut VmServiceClient<Channel>,
    vm_id: &str,
    from: u64,
) -> Result<u64> {
    let console = wait_console(
        vms,
        vm_id,
        &format!("vmmprobe: counter={}", from + 20),
        Duration::from_secs(120),
    )
    .await?;
    ensure!(!console.contains("Linux version"), "the guest booted again");
    for check in [
        "vmmprobe: mem-dirty passes=",
        "vmmprobe: blk-dirty dev=vdb passes=",
    ] {
        ensure!(
            console.contains(check),
            "no {check:?} line since the move:\n{console}"
        );
    }
    let failed = failed_checks(&console);
    ensure!(failed.is_empty(), "stale or damaged pages or blocks: {failed:?}");
    Ok(probe_counters(&console).last().copied().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_moves_between_agents_and_nothing_is_lost() -> Result<()> {
    harness::require_kvm();
    let net = segment()?;
    let ca = Ca::new("migration test CA")?;
    let (mut source, src_dir) = agent(&net.a, &ca, "mig-a", HOST_A, PORT, JAILED)?;
    let (mut dest, dst_dir) = agent(&net.b, &ca, "mig-b", HOST_B, PORT, &[])?;
    let host_mib = vmm_agent::host::host_memory_mib();
    let reserve = (host_mib - 64).to_string();
    let (small, small_dir) = agent(
        &net.b,
        &ca,
        "mig-small",
        HOST_B,
        SMALL_PORT,
        &["--reserve-memory-mib", &reserve],
    )?;
    for a in [&source, &dest, &small] {
        a.wait_serving().await?;
    }
    let shared = state_dir("mig-shared")?;
    let disk = shared.path().join("data.img");
    std::fs::File::create(&disk)?.set_len(8 << 20)?;
    let scratch = shared.path().join("scratch.img");
    std::fs::File::create(&scratch)?.set_len(4 << 20)?;

    // The guest: writes its disk, keeps rewriting (and checking) the start of a second one and a
    // buffer in memory, serves echo, counts.
    let mut spec = probe_spec(&format!(
        "blk-write:vda:0:64k:5,blk-flush:vda,blk-dirty:vdb:1m,net-echo:{ECHO_PORT},mem-dirty:4m,counter"
    ))?;
    spec.cmdline.push_str(&format!(
        " vmmprobe.count=1000000 ip={GUEST_IP}::{HOST_A}:255.255.255.0::eth0:off"
    ));
    spec.track_dirty_pages = true;
    spec.disks = [&disk, &scratch]
        .map(|path| Disk {
            path: path.display().to_string(),
            ..Default::default()
        })
        .into();
    spec.nics = vec![NicSpec {
        id: "eth0".into(),
        tap: TAP.into(),
        ..Default::default()
    }];
    let mut src_vms = source.vms().await?;
    let src_channel = source.channel().await?;
    let mut migrations = MigrationServiceClient::new(src_channel.clone());
    src_vms
        .create_vm(CreateVmRequest {
            vm_id: "mover".into(),
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?;
    wait_console(&mut src_vms, "mover", "vmmprobe: counter=3", BOOT_TIMEOUT).await?;
    let jailed = src_vms
        .get_vm(GetVmRequest {
            vm_id: "mover".into(),
        })
        .await?
        .into_inner();
    ensure!(jailed.jail_uid != 0, "the source did not jail the VM: {jailed:?}");
    assert_eq!(
        std::fs::metadata(&disk)?.uid(),
        jailed.jail_uid,
        "the disk does not belong to the jail"
    );
    let disk_before = sha256(&disk)?;
    let stop = Arc::new(AtomicBool::new(false));
    let client = echo_client(&net.client, stop.clone())?;
    let to_b = format!("tcp://{HOST_B}:{PORT}");

    // A destination that cannot hold the VM refuses before any memory moves.
    let op = migrations
        .migrate_vm(request(&format!("tcp://{HOST_B}:{SMALL_PORT}"), 0))
        .await?
        .into_inner();
    let op = wait_done(&src_channel, op).await?;
    assert_eq!(error_code(&op), Some(Code::ResourceExhausted), "{op:?}");
    let sent = op
        .metadata
        .as_ref()
        .and_then(|m| m.progress)
        .map_or(0, |p| p.done_bytes);
    assert_eq!(sent, 0, "{op:?}");
    nothing_left(&mut small.vms().await?, small_dir.path()).await?;

    // Only peers prepare incoming migrations: an operator of the same CA is denied, a peer
    // certificate from another CA is refused at the connection. (From the client's namespace:
    // the hosts' addresses exist only on the segment.)
    let mut operator = ca.client(Some("operator"))?;
    operator.ca = ca.pem.clone().into_bytes();
    let other = Ca::new("another CA")?;
    let (c, k) = other.leaf(vec![SanType::URI("vmmagent-role:migration-peer".try_into()?)])?;
    let foreign = ClientTls {
        ca: ca.pem.clone().into_bytes(),
        identity: Some((c.into_bytes(), k.into_bytes())),
    };
    let endpoint = to_b.clone();
    let refusals = in_namespace(&net.client, async move {
        let prepare = PrepareIncomingRequest {
            vm_id: "intruder".into(),
            ..Default::default()
        };
        let e = MigrationPeerServiceClient::new(connect(&endpoint, Some(operator)).await?)
            .prepare_incoming(prepare.clone())
            .await
            .unwrap_err();
        ensure!(e.code() == Code::PermissionDenied, "{e:?}");
        let refused = match connect(&endpoint, Some(foreign)).await {
            Err(_) => true,
            Ok(ch) => MigrationPeerServiceClient::new(ch)
                .prepare_incoming(prepare)
                .await
                .is_err_and(|e| e.code() != Code::PermissionDenied && e.code() != Code::InvalidArgument),
        };
        ensure!(refused, "a certificate from another CA got in");
        Ok(())
    });
    refusals.await?;

    // Cancelled mid-way (1 MiB/s makes the first round last): calls that change the VM are
    // refused meanwhile; afterwards it runs here and nothing is left there.
    let op = migrations.migrate_vm(request(&to_b, 1 << 20)).await?.into_inner();
    wait_copying(&mut migrations, src_dir.path()).await?;
    let e = src_vms
        .pause_vm(PauseVmRequest {
            vm_id: "mover".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("migrating"), "{e:?}");
    let e = migrations.migrate_vm(request(&to_b, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    migrations
        .cancel_migration(CancelMigrationRequest {
            vm_id: "mover".into(),
        })
        .await?;
    let op = wait_done(&src_channel, op).await?;
    assert_eq!(error_code(&op), Some(Code::Cancelled), "{op:?}");
    wait_state(&mut src_vms, "mover", VmState::Running, Duration::from_secs(10)).await?;
    let mut dst_vms = dest.vms().await?;
    nothing_left(&mut dst_vms, dst_dir.path()).await?;

    // The destination's vmm killed mid-way: the same.
    let op = migrations.migrate_vm(request(&to_b, 1 << 20)).await?.into_inner();
    wait_copying(&mut migrations, src_dir.path()).await?;
    let victims = vmm_processes_under(dst_dir.path());
    ensure!(victims.len() == 1, "destination vmms: {victims:?}");
    std::process::Command::new("kill")
        .args(["-9", &victims[0].to_string()])
        .status()?;
    let op = wait_done(&src_channel, op).await?;
    assert_eq!(error_code(&op), Some(Code::Aborted), "{op:?}");
    wait_state(&mut src_vms, "mover", VmState::Running, Duration::from_secs(10)).await?;
    nothing_left(&mut dst_vms, dst_dir.path()).await?;

    // The source's agent killed mid-way: its vmm goes on alone until the restarted agent cancels
    // the migration, which the operation reports as aborted; the VM runs on here.
    let op = migrations.migrate_vm(request(&to_b, 1 << 20)).await?.into_inner();
    wait_copying(&mut migrations, src_dir.path()).await?;
    source.kill9();
    let source = restart(&net.a, src_dir.path(), HOST_A, PORT, JAILED)?;
    source.wait_serving().await?;
    let mut src_vms = source.vms().await?;
    let src_channel = source.channel().await?;
    let op = wait_done(&src_channel, op).await?;
    assert_eq!(error_code(&op), Some(Code::Aborted), "{op:?}");
    wait_state(&mut src_vms, "mover", VmState::Running, Duration::from_secs(30)).await?;
    let vm = src_vms
        .get_vm(GetVmRequest {
            vm_id: "mover".into(),
        })
        .await?
        .into_inner();
    assert_eq!(vm.migrating_to, "", "{vm:?}");
    ensure!(
        vmm_processes_under(src_dir.path()).len() == 1,
        "not one vmm at the source"
    );
    nothing_left(&mut dst_vms, dst_dir.path()).await?;

    // The destination's agent killed mid-way: restarted, it ends the half-received VM and keeps
    // nothing of it; the source's vmm loses its peer and runs on.
    let mut migrations = MigrationServiceClient::new(src_channel.clone());
    let op = migrations.migrate_vm(request(&to_b, 1 << 20)).await?.into_inner();
    wait_copying(&mut migrations, src_dir.path()).await?;
    dest.kill9();
    let mut dest = restart(&net.b, dst_dir.path(), HOST_B, PORT, &[])?;
    dest.wait_serving().await?;
    let mut dst_vms = dest.vms().await?;
    nothing_left(&mut dst_vms, dst_dir.path()).await?;
    let op = wait_done(&src_channel, op).await?;
    assert_eq!(error_code(&op), Some(Code::Aborted), "{op:?}");
    wait_state(&mut src_vms, "mover", VmState::Running, Duration::from_secs(30)).await?;
    let before = probe_counters(
        &wait_console(
            &mut src_vms,
            "mover",
            "vmmprobe: counter=",
            Duration::from_secs(10),
        )
        .await?,
    );
    let counted = before.last().copied().unwrap_or(0);

    // The real one, through vmmctl.
    let last = vmmctl_migrate(&source, &dest, "mover", &to_b, &["--shared-storage"])?;
    let downtime = last["downtime_ms"].as_u64().context("downtime_ms")?;
    assert_eq!(
        last["disk_transferred_bytes"], 0,
        "shared disks were copied: {last}"
    );

    // The destination runs it: the counter goes on from where it was, without a boot, and its
    // buffer and disk checked out, pass after pass, across the move.
    wait_state(&mut dst_vms, "mover", VmState::Running, Duration::from_secs(30)).await?;
    let counted = runs_on_with_clean_checks(&mut dst_vms, "mover", counted).await?;
    // The source has nothing of it.
    let e = src_vms
        .get_vm(GetVmRequest {
            vm_id: "mover".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    ensure!(
        vmm_processes_under(src_dir.path()).is_empty(),
        "a vmm is left at the source"
    );
    assert!(!src_dir.path().join("vms/mover").exists());
    assert!(
        !src_dir.path().join("jails/mover").exists(),
        "the source's jail is left"
    );
    assert_eq!(
        std::fs::metadata(&disk)?.uid(),
        0,
        "the disk's owner was not given back"
    );
    assert_eq!(sha256(&disk)?, disk_before, "the disk changed");

    // Back to A without shared storage: the agents copy both disks into A's VM directory while
    // the guest keeps rewriting the second one. B's agent is killed mid-way and the vmms finish
    // without it; restarted (even with --restore-on-boot), it does not start its old copy of the
    // VM, which runs at A now, and says why. The copy of the disk the guest no longer writes is
    // identical.
    let to_a = format!("tcp://{HOST_A}:{PORT}");
    let mut dst_migrations = MigrationServiceClient::new(dest.channel().await?);
    let op = dst_migrations
        .migrate_vm(MigrateVmRequest {
            shared_storage: false,
            ..request(&to_a, 2 << 20)
        })
        .await?
        .into_inner();
    wait_copying(&mut dst_migrations, dst_dir.path()).await?;
    dest.kill9();
    wait_state(&mut src_vms, "mover", VmState::Running, Duration::from_secs(120)).await?;
    runs_on_with_clean_checks(&mut src_vms, "mover", counted).await?;
    // It arrived in a jail of A's: the vmm that received it runs as the VM's jail uid, its
    // disk copies handed to it as descriptors.
    let arrived = src_vms
        .get_vm(GetVmRequest {
            vm_id: "mover".into(),
        })
        .await?
        .into_inner();
    ensure!(
        arrived.jail_uid != 0,
        "A did not jail the arriving VM: {arrived:?}"
    );
    let receiver = vmm_agent::process::vm_process(arrived.pid);
    ensure!(
        receiver != arrived.pid,
        "no jailed child under the launcher {}",
        arrived.pid
    );
    assert_eq!(common::uids(receiver), vec![arrived.jail_uid; 4]);
    let copies = src_dir.path().join("vms/mover");
    assert_eq!(
        sha256(&copies.join("disk0.img"))?,
        disk_before,
        "the copied disk differs"
    );
    assert!(copies.join("disk1.img").exists());
    let dest = restart(&net.b, dst_dir.path(), HOST_B, PORT, &["--restore-on-boot"])?;
    dest.wait_serving().await?;
    let mut dst_vms = dest.vms().await?;
    let op = wait_done(&dest.channel().await?, op).await?;
    assert_eq!(error_code(&op), Some(Code::Aborted), "{op:?}");
    let left = dst_vms
        .get_vm(GetVmRequest {
            vm_id: "mover".into(),
        })
        .await?
        .into_inner();
    assert_eq!(left.state(), VmState::Failed, "{left:?}");
    assert_eq!(left.migrating_to, to_a, "{left:?}");
    assert!(left.state_reason.contains("runs there now"), "{left:?}");
    ensure!(
        vmm_processes_under(dst_dir.path()).is_empty(),
        "B started its old copy again"
    );
    let e = dst_vms
        .start_vm(StartVmRequest {
            vm_id: "mover".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    dst_vms
        .delete_vm(DeleteVmRequest {
            vm_id: "mover".into(),
            request_id: String::new(),
        })
        .await?;
    nothing_left(&mut dst_vms, dst_dir.path()).await?;
    // Images outside the VM's directory stay where they were, as DeleteVm leaves them.
    assert_eq!(sha256(&disk)?, disk_before, "the source's image changed");

    // The client's connection lived through all of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    let echoes = client
        .join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    ensure!(echoes.round_trips > 10, "{echoes:?}");
    eprintln!(
        "migration: downtime {downtime} ms (source's view), longest echo gap {:?} (client's view), {} round trips",
        echoes.longest_gap, echoes.round_trips
    );

    src_vms
        .delete_vm(DeleteVmRequest {
            vm_id: "mover".into(),
            request_id: String::new(),
        })
        .await?;
    nothing_left(&mut src_vms, src_dir.path()).await?;
    assert!(!src_dir.path().join("jails/mover").exists(), "A's jail is left");
    Ok(())
}
