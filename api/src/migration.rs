//! Live migration requests of the control protocol.
//!
//! The source VMM sends its running VM over a connected stream (a socket the caller set up and
//! passed with `add-fds`: the VMM opens no network connections itself) to a destination VMM started
//! empty, which received the other end the same way:
//!
//! ```text
//! destination: -> {"id": 1, "request": {"add-fds": {"names": ["mig"]}}}   (+ the fd)
//!              -> {"id": 2, "request": {"migrate-receive": {"connection": "mig"}}}
//! source:      -> {"id": 1, "request": {"add-fds": {"names": ["mig"]}}}   (+ the fd)
//!              -> {"id": 2, "request": {"migrate-send": {"connection": "mig", "max_downtime_ms": 300}}}
//!              <- {"id": 2, "ok": {"migration-started": ...}}
//!              <- {"event": {"migration-progress": {...}}}   (every round)
//!              <- {"event": {"migration-completed": {...}}}  then exit, code 0
//! destination: <- {"id": 2, "ok": {"migration-received": {"state": "running", ...}}}
//! ```
//!
//! Memory goes first (all pages that hold data, then rounds of the pages written since), then,
//! with the source paused, the rest and the vCPU and device state. The destination builds the VM
//! paused and says it is ready; only then does the source commit and end. Until the commit the
//! source owns the VM: any failure resumes it there. Disks: either both VMMs see the
//! same images (shared storage; the source gives up its locks on them at the switch-over), or, with
//! `copy_disks`, the source copies them too, in the same rounds as memory: all data first, then
//! the chunks the guest wrote since.
//!
//! Between hosts the connection is TCP with mutual TLS (`tls` on both requests; the source is the
//! client) and the destination's agent hands out a one-time `token` that the source's handshake
//! must carry: a peer that has neither the certificate nor the token gets nothing.

use serde::{Deserialize, Serialize};

/// The version of the VMM-to-VMM migration protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 3;

/// Default longest pause of the guest at the switch-over.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;
/// Default and longest time a migration may take before its timeout policy applies.
pub const DEFAULT_MIGRATION_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// Longest timeout a request may set.
pub const MAX_MIGRATION_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

fn default_max_downtime_ms() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}

fn yes() -> bool {
    true
}

fn default_timeout_ms() -> u64 {
    DEFAULT_MIGRATION_TIMEOUT_MS
}

/// The parameters of `migrate-send`. The VM must be running or paused; it needs
/// `machine.track_dirty_pages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateSend {
    /// The name (from `add-fds`) of the connected stream to the destination.
    pub connection: String,
    /// The switch-over happens once the estimated time to send what remains fits this.
    #[serde(default = "default_max_downtime_ms")]
    pub max_downtime_ms: u64,
    /// Most bytes per second to send (0: as fast as the connection takes them).
    #[serde(default)]
    pub bandwidth_bytes_per_s: u64,
    /// How long pre-copy may go on before `on_timeout` decides.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// What a migration that has not converged in time does.
    #[serde(default)]
    pub on_timeout: TimeoutPolicy,
    /// Slow the vCPUs down, step by step, while the guest dirties memory faster than it is
    /// sent (auto-converge): first by 20 %, then 10 % more each time, up to 99 %.
    #[serde(default = "yes")]
    pub auto_converge: bool,
    /// Copy the drives' contents too (local disks, no storage both hosts see): all of each image
    /// while the guest runs, then, round by round, what it wrote meanwhile, and the rest while
    /// it is paused. The destination names an empty file (or one of the same size) per drive.
    #[serde(default)]
    pub copy_disks: bool,
    /// Mutual TLS on the connection (this side is the client); without it the stream is plain,
    /// for connections that never leave the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MigrationTls>,
    /// The one-time token the destination was given for this migration; sent in the handshake.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

/// The TLS identity of one side of a migration connection. The source is the TLS client and
/// checks the destination's certificate against `ca_pem` and `server_name`; the destination asks
/// the source for a certificate that chains to `ca_pem`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationTls {
    /// This side's certificate chain, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The CA (one or more certificates, PEM) the peer's certificate must chain to.
    pub ca_pem: String,
    /// Source only: the name (DNS name or IP address) the destination's certificate must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl std::fmt::Debug for MigrationTls {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationTls")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// What a migration does when its timeout passes before it converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutPolicy {
    /// Give up; the VM runs on at the source.
    #[default]
    Cancel,
    /// Switch over now, whatever the downtime.
    Force,
}

/// The parameters of `migrate-receive`, sent to a VMM started without a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateReceive {
    /// The name (from `add-fds`) of the connected stream from the source.
    pub connection: String,
    /// What differs on this host: the taps the NICs use (their MACs stay), where each drive's
    /// image is (the same image on storage both hosts see, `path` or `fd`; or, when the source
    /// copies the disks, the `path` of the file that receives the copy: empty, or already of the
    /// drive's size), where the serial console goes.
    #[serde(default)]
    pub overrides: crate::snapshot::RestoreOverrides,
    /// Mutual TLS on the connection (this side is the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MigrationTls>,
    /// When set, the source's handshake must carry this token (compared in constant time), or
    /// the migration is refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

/// Where a migration is, in libvirt's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Handshake.
    #[default]
    Setup,
    /// Memory rounds while the guest runs.
    PreCopy,
    /// The guest is paused; the rest and the device state are on their way.
    SwitchOver,
    /// The destination runs the VM.
    Completed,
    /// It failed or was cancelled; the VM runs on at the source.
    Failed,
}

/// Progress and outcome of a migration (source side).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationStats {
    /// Where it is.
    pub phase: MigrationPhase,
    /// Memory round: 0 sends every page that holds data, later ones the pages written since.
    pub iteration: u32,
    /// Guest memory size.
    pub memory_total_bytes: u64,
    /// Bytes of pages sent so far (all rounds).
    pub memory_transferred_bytes: u64,
    /// Bytes of pages known to be dirty and not yet sent.
    pub memory_remaining_bytes: u64,
    /// Size of the drives being copied (0 with shared storage).
    #[serde(default)]
    pub disk_total_bytes: u64,
    /// Bytes of disk contents sent so far (all rounds).
    #[serde(default)]
    pub disk_transferred_bytes: u64,
    /// Bytes of disk chunks known to be written by the guest and not yet sent.
    #[serde(default)]
    pub disk_remaining_bytes: u64,
    /// Bytes of pages the guest dirtied per second during the last round.
    pub dirty_rate_bytes_per_s: u64,
    /// Bytes per second the last round was sent at.
    pub throughput_bytes_per_s: u64,
    /// Time the switch-over would take now, from the remaining bytes and the throughput.
    pub expected_downtime_ms: u64,
    /// How much the vCPUs are slowed down (auto-converge), in percent.
    pub throttle_percent: u32,
    /// Time since the migration began.
    pub elapsed_ms: u64,
    /// Once completed: how long the guest was paused (source pause to destination resume, as
    /// far as the source saw it: to the destination's ready answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Once failed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
