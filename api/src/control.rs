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

use crate::config::VmConfig;
use crate::rate_limiter::RateLimiterConfig;

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
    /// Stops the VM at once (no guest shutdown); the VMM exits with 0.
    Stop,
    /// Replaces a drive's rate limits while it runs.
    UpdateRateLimiter {
        /// The drive's id.
        drive: String,
        /// The new limits; an absent or all-zero bucket removes that limit.
        rate_limiter: RateLimiterConfig,
    },
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
    /// Answer to [`Request::Stop`]: the VMM exits right after sending it.
    Stopping,
    /// Answer to [`Request::UpdateRateLimiter`].
    RateLimiterUpdated,
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
    /// The guest signalled that it finished booting (boot-timer port).
    GuestBootComplete {
        /// Milliseconds from VMM start.
        boot_ms: u64,
    },
    /// The VM ended; the VMM exits right after.
    Exit {
        /// Why (guest power off, reboot, panic, vCPU failure, stop request).
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
    /// The VMM failed to do it.
    Internal,
}

/// Lifecycle state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
}

/// Answer to [`Request::Describe`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDescription {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// Its state.
    pub state: VmState,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
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
