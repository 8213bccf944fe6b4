//! The `vmm` control socket protocol: newline-delimited JSON over a Unix socket.
//!
//! A client writes one [`RequestLine`] per line and gets one [`ResponseLine`] per request, carrying the
//! request's `id`. Between answers the VMM may send [`EventLine`]s (`{"event": ...}`) to every client.
//! Lines are at most [`MAX_LINE_BYTES`] long.
//!
//! ```text
//! -> {"id": 1, "request": "describe"}
//! <- {"id": 1, "ok": {"description": {"state": "running", ...}}}
//! -> {"id": 2, "request": {"update-rate-limiter": {"drive": "data", "rate_limiter": {...}}}}
//! <- {"id": 2, "ok": "rate-limiter-updated"}
//! -> {"id": 3, "request": "reboot"}
//! <- {"id": 3, "error": {"kind": "bad-request", "message": "unknown variant `reboot`, ..."}}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::balloon::{BalloonInfo, BalloonUpdate};
use crate::config::VmConfig;
pub use crate::migration::{MigrateReceive, MigrateSend, MigrationStats};
use crate::rate_limiter::RateLimiterConfig;
pub use crate::snapshot::{SnapshotCreate, SnapshotInfo, SnapshotKind, SnapshotMerge, SnapshotRestore};

/// The longest request line the VMM reads; a longer one gets an error and closes the connection.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// One request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLine {
    /// Chosen by the client, echoed in the response.
    #[serde(default)]
    pub id: u64,
    /// What to do.
    pub request: Request,
}

/// Longest graceful shutdown a client may ask for.
pub const MAX_SHUTDOWN_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// Graceful shutdown timeout when the request gives none.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 30 * 1000;
/// Most file descriptors one `add-fds` request may carry, and most the VMM holds in all.
pub const MAX_PASSED_FDS: usize = 64;

/// What a client can ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check.
    Ping,
    /// The configuration, state, uptime and size of the VM.
    Describe,
    /// Device counters, guest boot time, VMM memory.
    Metrics,
    /// Stops the vCPUs and device processing (requests in flight finish first). Pausing a paused
    /// VM changes nothing and says so.
    Pause,
    /// Restarts devices and vCPUs of a paused VM.
    Resume,
    /// Asks the guest to shut down (Ctrl-Alt-Del on its keyboard) and stops the VM hard if it has
    /// not ended after the timeout. A paused VM is resumed first, so that the guest can react.
    Shutdown(ShutdownRequest),
    /// Stops the VM at once (no guest shutdown); the VMM exits with 0.
    Stop,
    /// Replaces a drive's rate limits while it runs.
    UpdateRateLimiter {
        /// The drive's id.
        drive: String,
        /// The new limits; an absent or all-zero bucket removes that limit.
        rate_limiter: RateLimiterConfig,
    },
    /// Replaces a NIC's rate limits while it runs; an absent direction keeps its limits.
    UpdateNetRateLimiters {
        /// The NIC's id.
        net: String,
        /// New limits for frames to the guest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rx_rate_limiter: Option<RateLimiterConfig>,
        /// New limits for frames from the guest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tx_rate_limiter: Option<RateLimiterConfig>,
    },
    /// Changes the balloon's target (and statistics interval) while the VM runs.
    UpdateBalloon(BalloonUpdate),
    /// The balloon's target, actual size, the guest's memory statistics and the device counters.
    BalloonStats,
    /// Sets the VM's configuration (a VMM started without one, before `start`). May be repeated
    /// until `start`; the last one counts.
    Configure(VmConfig),
    /// Builds and boots the configured VM.
    Start,
    /// Names the file descriptors sent with this line (SCM_RIGHTS ancillary data on the same
    /// `sendmsg`), in order, so that a configuration can use them (`drives[].fd`, consumed at
    /// `start`) or a migration (`migrate-send`, `migrate-receive`, at any time). A name given again
    /// replaces its descriptor.
    AddFds {
        /// One name per descriptor (1-64 of `A-Z a-z 0-9 _ -`).
        names: Vec<String>,
    },
    /// Writes a snapshot of the paused VM (vCPUs, devices, memory, writable disks) to a new
    /// directory. The VM stays paused.
    SnapshotCreate(SnapshotCreate),
    /// Rebuilds a VM from a snapshot, in a VMM started without a configuration (instead of
    /// `configure` and `start`).
    SnapshotRestore(SnapshotRestore),
    /// Writes a diff snapshot and its chain as one full snapshot.
    SnapshotMerge(SnapshotMerge),
    /// Starts sending the running (or paused) VM to a destination VMM (see `migration`).
    /// Answered at once; `migration-progress` events follow, then `migration-completed` and the
    /// VMM's exit, or `migration-failed` with the VM running on here.
    MigrateSend(MigrateSend),
    /// Receives a migrating VM, in a VMM started without a configuration. Answered once the VM
    /// runs here (`migration-received`), or with the error that ended the migration.
    MigrateReceive(MigrateReceive),
    /// The progress of the migration this VMM sends.
    MigrationStatus,
    /// Cancels the migration this VMM sends, unless it is past the point of no return.
    MigrateCancel,
}

/// The parameters of [`Request::Shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// How long the guest may take before the VM is stopped hard, in milliseconds (default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT_MS`], at most [`MAX_SHUTDOWN_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One response line: `ok` or `error`, never both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseLine {
    /// The request's id (0 if the request could not be read).
    pub id: u64,
    /// The result.
    #[serde(flatten)]
    pub result: Outcome,
}

/// The result of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// It worked.
    Ok(Response),
    /// It did not.
    Error(ControlError),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong,
    /// Answer to [`Request::Describe`].
    Description(VmDescription),
    /// Answer to [`Request::Metrics`].
    Metrics(VmMetrics),
    /// Answer to [`Request::Pause`] and [`Request::Resume`].
    StateChange {
        /// The state the VM is in now.
        state: VmState,
        /// False if it already was in that state (nothing was done).
        changed: bool,
    },
    /// Answer to [`Request::Shutdown`]: the guest has been asked; an `exit` event follows.
    ShuttingDown {
        /// When the VM will be stopped hard if the guest has not ended, in milliseconds from now.
        timeout_ms: u64,
        /// False if the guest has disabled its keyboard, so only the timeout will end the VM.
        keyboard: bool,
    },
    /// Answer to [`Request::Stop`]: the VMM exits right after sending it.
    Stopping,
    /// Answer to [`Request::UpdateRateLimiter`].
    RateLimiterUpdated,
    /// Answer to [`Request::UpdateBalloon`]: the guest has been told (it moves at its own pace).
    BalloonUpdated,
    /// Answer to [`Request::BalloonStats`].
    BalloonStats(Box<BalloonInfo>),
    /// Answer to [`Request::Configure`].
    Configured,
    /// Answer to [`Request::Start`]: the VM is built and its vCPUs run.
    Started,
    /// Answer to [`Request::AddFds`].
    FdsAdded {
        /// The names now usable in the configuration.
        names: Vec<String>,
    },
    /// Answer to [`Request::SnapshotCreate`].
    SnapshotCreated(SnapshotInfo),
    /// Answer to [`Request::SnapshotMerge`]: the full snapshot written.
    SnapshotMerged(SnapshotInfo),
    /// Answer to [`Request::MigrateSend`]: the migration runs.
    MigrationStarted(MigrationStats),
    /// Answer to [`Request::MigrationStatus`].
    MigrationStatus(MigrationStats),
    /// Answer to [`Request::MigrateCancel`]: the migration will stop at its next step.
    MigrationCancelling,
    /// Answer to [`Request::MigrateReceive`]: the VM runs here.
    MigrationReceived {
        /// The VM's state (running, or paused if it was paused at the source).
        state: VmState,
        /// Bytes of memory received.
        memory_bytes: u64,
        /// Time from the request to the VM running here, in microseconds.
        duration_us: u64,
    },
    /// Answer to [`Request::SnapshotRestore`]: the VM is rebuilt, in the state it says.
    Restored {
        /// Running if the request asked to resume, else paused.
        state: VmState,
        /// Time from the request to the restored VM's vCPUs being ready (or running), in
        /// microseconds.
        duration_us: u64,
    },
}

/// An asynchronous notice, sent to every connected client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLine {
    /// What happened.
    pub event: Event,
}

/// Things that happen to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Event {
    /// The VM entered a new state (started, paused, resumed).
    StateChanged {
        /// The new state.
        state: VmState,
    },
    /// The guest signalled that it finished booting (boot-timer port).
    GuestBootComplete {
        /// Milliseconds from VMM start.
        boot_ms: u64,
    },
    /// The guest kernel panicked (pvpanic); an `exit` event follows.
    GuestPanic,
    /// A vCPU failed (triple fault, emulation failure, KVM error); an `exit` event follows.
    VcpuError {
        /// What happened.
        message: String,
    },
    /// A memory round of the migration this VMM sends is done.
    MigrationProgress(MigrationStats),
    /// The destination runs the VM; this VMM exits right after (`exit`, code 0).
    MigrationCompleted(MigrationStats),
    /// The migration failed or was cancelled; the VM runs on here (paused if it was paused).
    MigrationFailed(MigrationStats),
    /// The VM ended; the VMM exits right after.
    Exit {
        /// Why (guest power off, reboot, panic, vCPU failure, stop request, shutdown timeout).
        reason: String,
        /// The VMM's exit code.
        code: i32,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlError {
    /// Machine-readable class.
    pub kind: ErrorKind,
    /// For people.
    pub message: String,
}

/// Classes of [`ControlError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The line is not a valid request (bad JSON, unknown request or field, too long).
    BadRequest,
    /// A value in the request is invalid.
    InvalidArgument,
    /// The request names something the VM does not have.
    NotFound,
    /// The VM is not in a state that allows the request (e.g. `resume` before `start`).
    WrongState,
    /// The VMM failed to do it.
    Internal,
}

/// Lifecycle state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Started without a configuration: waiting for `configure`.
    NotConfigured,
    /// Configured, waiting for `start`.
    Configured,
    /// The vCPUs run.
    Running,
    /// vCPUs and devices are stopped; `resume` continues.
    Paused,
}

impl VmState {
    /// Its name on the wire (`not-configured`, `configured`, `running`, `paused`).
    pub fn name(self) -> &'static str {
        match self {
            VmState::NotConfigured => "not-configured",
            VmState::Configured => "configured",
            VmState::Running => "running",
            VmState::Paused => "paused",
        }
    }
}

/// Answer to [`Request::Describe`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDescription {
    /// The configuration the VM was (or will be) built from; none before `configure`.
    pub config: Option<VmConfig>,
    /// Its state.
    pub state: VmState,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// vCPUs (0 before `configure`).
    pub vcpus: u8,
    /// Guest memory in MiB (0 before `configure`).
    pub memory_mib: u64,
    /// The VMM's version.
    pub vmm_version: String,
}

/// Answer to [`Request::Metrics`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmMetrics {
    /// Process start to the guest's boot-complete signal, if it came.
    pub guest_boot_ms: Option<u64>,
    /// Resident memory of the VMM process, guest memory included, in KiB.
    pub vmm_rss_kib: u64,
    /// vCPU exits that reached the VMM, by reason (`io_in`, `io_out`, `mmio_read`, `mmio_write`,
    /// `interrupted`, `other`), summed over all vCPUs.
    pub vcpu_exits: BTreeMap<String, u64>,
    /// One entry per drive, in guest order.
    pub drives: Vec<DriveMetrics>,
    /// One entry per NIC, in guest order.
    #[serde(default)]
    pub nets: Vec<NetMetrics>,
    /// The balloon, if the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Box<BalloonInfo>>,
}

/// Counters of one NIC ("rx": to the guest, "tx": from the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetMetrics {
    /// The NIC's id.
    pub id: String,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (virtio-net headers excluded).
    pub rx_bytes: u64,
    /// Frames from the tap merged into the TCP segment before them, so delivered inside another
    /// frame (absent from older VMMs' answers).
    #[serde(default)]
    pub rx_coalesced: u64,
    /// Frames sent by the guest.
    pub tx_frames: u64,
    /// Bytes sent by the guest (virtio-net headers excluded).
    pub tx_bytes: u64,
    /// Frames dropped either way: too large, offloads the guest refused, malformed chains, tap
    /// errors.
    pub dropped: u64,
    /// Times the guest had no receive buffers when a frame arrived.
    pub rx_no_buffers: u64,
    /// Times a rate limiter held frames back, either way.
    pub throttled: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

/// Counters of one drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveMetrics {
    /// The drive's id.
    pub id: String,
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Discards and write-zeroes completed.
    pub discards: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Requests refused as malformed or unsupported.
    pub invalid_requests: u64,
    /// Requests that failed on the host.
    pub io_errors: u64,
    /// Times the rate limiter held requests back.
    pub throttled: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

impl ResponseLine {
    /// A failure answer.
    pub fn error(id: u64, kind: ErrorKind, message: impl Into<String>) -> Self {
        ResponseLine {
            id,
            result: Outcome::Error(ControlError {
                kind,
                message: message.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_and_reject_unknowns() {
        let line: RequestLine = serde_json::from_str(r#"{"id": 4, "request": "ping"}"#).unwrap();
        assert_eq!((line.id, line.request), (4, Request::Ping));
        let line: RequestLine = serde_json::from_str(
            r#"{"id": 5, "request": {"update-rate-limiter": {"drive": "d", "rate_limiter": {"ops": {"size": 10, "refill_time_ms": 1000}}}}}"#,
        )
        .unwrap();
        assert!(matches!(line.request, Request::UpdateRateLimiter { ref drive, .. } if drive == "d"));
        for bad in [
            r#"{"id": 1, "request": "reboot"}"#,
            r#"{"id": 1, "request": "ping", "extra": 1}"#,
            r#"{"id": 1}"#,
            r#"{"request": {"update-rate-limiter": {"drive": "d"}}}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<RequestLine>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn balloon_requests_parse() {
        let line: RequestLine =
            serde_json::from_str(r#"{"id": 1, "request": {"update-balloon": {"amount_mib": 64}}}"#).unwrap();
        assert_eq!(
            line.request,
            Request::UpdateBalloon(BalloonUpdate {
                amount_mib: Some(64),
                stats_interval_s: None
            })
        );
        let line: RequestLine = serde_json::from_str(r#"{"id": 2, "request": "balloon-stats"}"#).unwrap();
        assert_eq!(line.request, Request::BalloonStats);
        let bad = r#"{"id": 3, "request": {"update-balloon": {"amount": 64}}}"#;
        assert!(serde_json::from_str::<RequestLine>(bad).is_err());
        let info = Response::BalloonStats(Box::default());
        let text = serde_json::to_string(&info).unwrap();
        assert!(
            text.starts_with(r#"{"balloon-stats":{"target_pages":0"#),
            "{text}"
        );
    }

    #[test]
    fn state_names_are_the_wire_names() {
        for state in [
            VmState::NotConfigured,
            VmState::Configured,
            VmState::Running,
            VmState::Paused,
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
    }

    #[test]
    fn snapshot_requests_parse_with_defaults() {
        let line: RequestLine =
            serde_json::from_str(r#"{"id": 1, "request": {"snapshot-create": {"dir": "/s"}}}"#).unwrap();
        assert_eq!(
            line.request,
            Request::SnapshotCreate(SnapshotCreate {
                dir: "/s".into(),
                kind: SnapshotKind::Full
            })
        );
        let line: RequestLine = serde_json::from_str(
            r#"{"id": 2, "request": {"snapshot-restore": {"dir": "/s", "overrides": {"nets": [{"id": "eth0", "tap": "t1"}]}}}}"#,
        )
        .unwrap();
        let Request::SnapshotRestore(r) = line.request else {
            panic!("restore")
        };
        assert!(!r.resume);
        assert_eq!(r.overrides.nets[0].tap.as_deref(), Some("t1"));
        for bad in [
            r#"{"id": 3, "request": {"snapshot-create": {"dir": "/s", "kind": "partial"}}}"#,
            r#"{"id": 3, "request": {"snapshot-restore": {"dir": "/s", "overrides": {"nets": [{"id": "e", "mac": "02:00:00:00:00:01"}]}}}}"#,
            r#"{"id": 3, "request": {"snapshot-merge": {"from": "/a"}}}"#,
        ] {
            assert!(serde_json::from_str::<RequestLine>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_serialize_as_documented() {
        let ok = ResponseLine {
            id: 1,
            result: Outcome::Ok(Response::Pong),
        };
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"id":1,"ok":"pong"}"#);
        let err = ResponseLine::error(2, ErrorKind::NotFound, "no drive x");
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"id":2,"error":{"kind":"not-found","message":"no drive x"}}"#
        );
        let back: ResponseLine = serde_json::from_str(&serde_json::to_string(&err).unwrap()).unwrap();
        assert_eq!(back, err);
        let event = EventLine {
            event: Event::Exit {
                reason: "guest powered off".into(),
                code: 0,
            },
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"event":{"exit":{"reason":"guest powered off","code":0}}}"#
        );
    }
}
