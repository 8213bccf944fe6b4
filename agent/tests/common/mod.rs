//! Shared by the agent's end-to-end tests: run a real `vmm-agent` binary on a Unix socket in a
//! temporary state directory, and talk to it over real gRPC.
#![allow(dead_code)]

pub mod snapshots;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use harness::{GuestImages, TempDir};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vmm_agent::client::ClientTls;
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{GetConsoleRequest, GetVmRequest, Vm, VmSpec, VmState};

/// Most time a guest may take to print BOOT-COMPLETE on a busy 2-core kvm_pvm host.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// A running agent process.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
}

impl Agent {
    /// Starts `vmm-agent` on `<state_dir>/agent.sock` with extra flags.
    pub fn start(state_dir: &Path, extra: &[&str]) -> Result<Agent> {
        Self::start_in(None, state_dir, extra)
    }

    /// Like [`Agent::start`], in the network namespace `netns` if given (`ip netns exec`, which
    /// keeps the process id): its vmms then open their taps there.
    pub fn start_in(netns: Option<&str>, state_dir: &Path, extra: &[&str]) -> Result<Agent> {
        let socket = state_dir.join("agent.sock");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(state_dir.join("agent.log"))?;
        let agent = env!("CARGO_BIN_EXE_vmm-agent");
        let mut command = match netns {
            Some(ns) => {
                // `ip netns exec` gives the agent a mount namespace with a /sys of the netns,
                // which has no cgroup hierarchies: the host's are mounted again there (the same
                // hierarchies) so that the agent and its vmms (jailed ones make `vmm/<id>`) find
                // them as on a host. `exec` keeps the process id.
                let cgroups = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                    "mount -t cgroup2 none /sys/fs/cgroup"
                } else {
                    "mount -t tmpfs none /sys/fs/cgroup && for c in cpu memory pids; do \
                     mkdir /sys/fs/cgroup/$c && mount -t cgroup -o $c none /sys/fs/cgroup/$c || exit 1; done"
                };
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "sh", "-c"])
                    .arg(format!("{cgroups} && exec \"$0\" \"$@\""))
                    .arg(agent);
                c
            }
            None => Command::new(agent),
        };
        let child = command
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--vmm-bin")
            .arg(harness::vmm_binary())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start vmm-agent")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("the agent did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Agent {
            child,
            socket,
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> Result<Channel> {
        Ok(vmm_agent::client::connect_unix(self.socket.clone()).await?)
    }

    /// A VmService client.
    pub async fn vms(&self) -> Result<VmServiceClient<Channel>> {
        Ok(VmServiceClient::new(self.channel().await?))
    }

    /// The overall health status.
    pub async fn health(&self) -> Result<ServingStatus> {
        let mut client = HealthClient::new(self.channel().await?);
        let r = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(r.into_inner().status())
    }

    /// Waits until health says SERVING.
    pub async fn wait_serving(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(ServingStatus::Serving) = self.health().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent did not become SERVING");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A fresh state directory (short path: control socket paths must fit in 108 bytes). VMs outlive
/// their agent by design, so dropping it also kills the vmms still running under it: a failed
/// test must not leave guests burning the host's CPU for the tests after it.
pub fn state_dir(tag: &str) -> Result<StateDir> {
    Ok(StateDir(TempDir::new_in(Path::new("/tmp"), tag)?))
}

/// See [`state_dir`].
pub struct StateDir(TempDir);

/// The parent cgroup the agent of `state_dir` made for its VMs (v2 or v1's cpu hierarchy), if any.
pub fn cgroup_parent(state_dir: &Path) -> Option<PathBuf> {
    let name = vmm_agent::cgroups::default_name(state_dir);
    let root = Path::new("/sys/fs/cgroup");
    [root.join(&name), root.join("cpu").join(&name)]
        .into_iter()
        .find(|p| p.is_dir())
}

impl StateDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        for pid in vmm_processes_under(self.path()) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .output();
        }
        // The agent's cgroups for this state dir, once their processes are gone.
        let name = vmm_agent::cgroups::default_name(self.path());
        for _ in 0..50 {
            vmm_agent::cgroups::remove_tree(Path::new("/sys/fs/cgroup"), &name);
            if cgroup_parent(self.path()).is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A spec that boots the test kernel with the probe doing `actions`.
pub fn probe_spec(actions: &str) -> Result<VmSpec> {
    let images = GuestImages::get()?;
    Ok(VmSpec {
        vcpus: 1,
        memory_mib: 128,
        kernel: images.vmlinux.display().to_string(),
        initrd: images.initramfs.display().to_string(),
        cmdline: harness::probe_cmdline(actions),
        ..Default::default()
    })
}

/// Reads the console through GetConsole (following) until `text` appears, and returns its
/// complete lines: the stream may stop half-way through a line the guest is still printing
/// ("... errors=" without its value yet, "counter=4" of "counter=45"), which no caller must parse.
pub async fn wait_console(
    vms: &mut VmServiceClient<Channel>,
    vm_id: &str,
    text: &str,
    timeout: Duration,
) -> Result<String> {
    let read = async {
        let mut stream = vms
            .get_console(GetConsoleRequest {
                vm_id: vm_id.into(),
                tail_bytes: 1 << 20,
                follow: true,
            })
            .await?
            .into_inner();
        let mut seen = Vec::new();
        while let Some(chunk) = stream.message().await? {
            seen.extend_from_slice(&chunk.data);
            let end = seen.iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
            let complete = String::from_utf8_lossy(&seen[..end]);
            if complete.contains(text) {
                return Ok(complete.into_owned());
            }
        }
        let seen = String::from_utf8_lossy(&seen);
        bail!("the console stream ended without '{text}':\n{seen}")
    };
    tokio::time::timeout(timeout, read)
        .await
        .with_context(|| format!("no '{text}' on the console of {vm_id} within {timeout:?}"))?
}

/// The value of every `vmmprobe: counter=N` line of `console` (the probe's `counter` action: a
/// guest that goes on after a snapshot, restore or migration counts on from where it was).
pub fn probe_counters(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| {
            l.split_once("vmmprobe: counter=")
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .collect()
}

/// Polls GetVm until the VM is in `state`.
pub async fn wait_state(
    vms: &mut VmServiceClient<Channel>,
    vm_id: &str,
    state: VmState,
    timeout: Duration,
) -> Result<Vm> {
    let deadline = Instant::now() + timeout;
    loop {
        let vm = vms
            .get_vm(GetVmRequest { vm_id: vm_id.into() })
            .await?
            .into_inner();
        if vm.state() == state {
            return Ok(vm);
        }
        if Instant::now() > deadline {
            bail!("{vm_id} is {:?}, not {state:?}", vm.state());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `Uid:` line of a process: real, effective, saved and file-system uids.
pub fn uids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|v| v.split_whitespace().filter_map(|u| u.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether a process with this pid exists (and is no zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// The vmm processes of VMs under the state directory `dir`, one per VM: a jailed vmm's launcher,
/// not also the child it forked (which has the same command line).
pub fn vmm_processes_under(dir: &Path) -> Vec<u32> {
    // The agent itself names the state dir too; a vmm names its socket or configuration under vms/.
    let needle = dir.join("vms").display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) && alive(pid) {
            pids.push(pid);
        }
    }
    // A jailed launcher runs its VM in a child (`vm_process` finds it); an unjailed vmm is its own.
    let jailed_children: Vec<u32> = pids
        .iter()
        .map(|&pid| (pid, vmm_agent::process::vm_process(pid)))
        .filter(|(pid, vm)| vm != pid)
        .map(|(_, vm)| vm)
        .collect();
    pids.retain(|pid| !jailed_children.contains(pid));
    pids
}

/// The `key=value` fields of the probe line containing `vmmprobe: {prefix}`, or an error that
/// shows the console.
pub fn probe_fields(console: &str, prefix: &str) -> Result<std::collections::HashMap<String, String>> {
    harness::find_probe_fields(console, prefix)
        .ok_or_else(|| anyhow::anyhow!("no 'vmmprobe: {prefix}' in:\n{console}"))
}

/// A CA that signs certificates into PEM files under `dir`.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key)?.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A leaf certificate with `sans`; returns (cert, key) PEM.
    pub fn leaf(&self, sans: Vec<SanType>) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    pub fn client(&self, role: Option<&str>) -> Result<ClientTls> {
        let sans = match role {
            Some(r) => vec![SanType::URI(format!("vmmagent-role:{r}").try_into()?)],
            None => vec![SanType::URI("spiffe://test/nobody".try_into()?)],
        };
        let (cert, key) = self.leaf(sans)?;
        Ok(ClientTls {
            ca: Vec::new(),
            identity: Some((cert.into_bytes(), key.into_bytes())),
        })
    }
}

/// An agent that serves TCP on loopback with mutual TLS (besides its Unix socket), and the CA
/// that signed its certificate and signs its clients'.
pub struct TlsAgent {
    pub agent: Agent,
    /// `tcp://127.0.0.1:PORT`.
    pub endpoint: String,
    pub ca: Ca,
}

impl TlsAgent {
    /// Starts `vmm-agent` in `state_dir` on a free loopback port with a fresh PKI.
    pub fn start(state_dir: &Path) -> Result<TlsAgent> {
        let ca = Ca::new("vmm test CA")?;
        let (server_cert, server_key) = ca.leaf(vec![
            SanType::IpAddress("127.0.0.1".parse()?),
            SanType::DnsName("localhost".try_into()?),
        ])?;
        let cert = write(state_dir, "server.pem", &server_cert)?;
        let key = write(state_dir, "server.key", &server_key)?;
        let ca_file = write(state_dir, "ca.pem", &ca.pem)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let agent = Agent::start(
            state_dir,
            &[
                "--listen",
                &endpoint,
                "--tls-cert",
                &cert.display().to_string(),
                "--tls-key",
                &key.display().to_string(),
                "--tls-client-ca",
                &ca_file.display().to_string(),
            ],
        )?;
        Ok(TlsAgent { agent, endpoint, ca })
    }

    /// Client TLS settings with a certificate for `role` (none: a certificate without a role),
    /// trusting the agent's CA.
    pub fn client(&self, role: Option<&str>) -> Result<ClientTls> {
        let mut tls = self.ca.client(role)?;
        tls.ca = self.ca.pem.clone().into_bytes();
        Ok(tls)
    }

    /// A VmService client over TLS with `role`.
    pub async fn vms(&self, role: &str) -> Result<VmServiceClient<Channel>> {
        let channel = vmm_agent::client::connect(&self.endpoint, Some(self.client(Some(role))?)).await?;
        Ok(VmServiceClient::new(channel))
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}
