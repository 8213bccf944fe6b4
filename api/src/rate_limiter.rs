//! Rate-limit settings of an I/O device (virtio-blk, later virtio-net): a token bucket for bytes and one
//! for operations, as read from `vm.json`, from the compact keys of a `--drive` flag, or sent at run time.
//!
//! A bucket holds up to `size` tokens and refills from empty to full in `refill_time_ms`; each request
//! takes its bytes (or one operation) from it, and waits when the bucket runs dry. `one_time_burst` is
//! extra credit, spent first and never refilled, so a guest can boot or warm its caches quickly.
//!
//! # Command-line keys
//!
//! Inside a device flag such as `--drive path=disk.img,bw=10M,iops=1000`:
//!
//! | key          | meaning                                             | bucket                       |
//! |--------------|-----------------------------------------------------|------------------------------|
//! | `bw`         | bytes per second; `K`, `M`, `G` suffixes are 1024ⁿ  | size = N, refill 1000 ms     |
//! | `bw_burst`   | one-time burst in bytes, same suffixes; needs `bw`  | one_time_burst = N           |
//! | `iops`       | operations per second                               | size = N, refill 1000 ms     |
//! | `iops_burst` | one-time burst in operations; needs `iops`          | one_time_burst = N           |
//!
//! A rate of `0` means unlimited. Finer control (other refill times, a bucket smaller than one second of
//! traffic) is only available through the JSON form.

use serde::{Deserialize, Serialize};

/// Longest accepted refill time: one hour. Bounded so that nanosecond arithmetic never overflows and
/// because a longer period is more likely a unit mistake than an intent.
pub const MAX_REFILL_TIME_MS: u64 = 60 * 60 * 1000;

/// Refill time of the buckets built from command-line keys: rates are per second.
pub const CLI_REFILL_TIME_MS: u64 = 1000;

/// Why a rate-limiter setting was rejected. Messages name the offending field or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimiterConfigError {
    /// A JSON field is out of range or inconsistent with its siblings.
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the field inside the rate limiter, e.g. `bandwidth.refill_time_ms`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A command-line key has a bad value, is repeated, or lacks its companion.
    #[error("{key}: {reason}")]
    Cli {
        /// The key, e.g. `bw_burst`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// One token bucket. All zero means "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Capacity: the most tokens (bytes or operations) available at once.
    pub size: u64,
    /// Extra tokens available once at start, spent before `size` and never refilled.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Time for an empty bucket to fill to `size`, in milliseconds; 1 to [`MAX_REFILL_TIME_MS`].
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// A bucket of `per_second` tokens refilled every second (the command-line form).
    pub fn per_second(per_second: u64, one_time_burst: u64) -> Self {
        TokenBucketConfig {
            size: per_second,
            one_time_burst,
            refill_time_ms: CLI_REFILL_TIME_MS,
        }
    }

    /// Whether this bucket limits anything; all-zero means unlimited.
    pub fn is_enabled(&self) -> bool {
        self.size != 0 || self.refill_time_ms != 0 || self.one_time_burst != 0
    }

    /// Checks the bucket; `fields` name its fields in errors.
    fn validate(&self, fields: &BucketFields) -> Result<(), RateLimiterConfigError> {
        if !self.is_enabled() {
            return Ok(());
        }
        if self.size == 0 {
            return Err(RateLimiterConfigError::Invalid {
                field: fields.size,
                reason: "must be non-zero when the bucket is enabled (set every field to 0 for no limit)"
                    .into(),
            });
        }
        if self.refill_time_ms == 0 {
            return Err(RateLimiterConfigError::Invalid {
                field: fields.refill_time_ms,
                reason: "must be non-zero when the bucket is enabled (set every field to 0 for no limit)"
                    .into(),
            });
        }
        if self.refill_time_ms > MAX_REFILL_TIME_MS {
            return Err(RateLimiterConfigError::Invalid {
                field: fields.refill_time_ms,
                reason: format!(
                    "must be at most {MAX_REFILL_TIME_MS} (one hour), got {}",
                    self.refill_time_ms
                ),
            });
        }
        Ok(())
    }
}

/// Field paths of one bucket, so that errors can name them with a `&'static str`.
struct BucketFields {
    size: &'static str,
    refill_time_ms: &'static str,
}

const BANDWIDTH_FIELDS: BucketFields = BucketFields {
    size: "bandwidth.size",
    refill_time_ms: "bandwidth.refill_time_ms",
};

const OPS_FIELDS: BucketFields = BucketFields {
    size: "ops.size",
    refill_time_ms: "ops.refill_time_ms",
};

/// The rate limiter of one device: a bytes bucket, an operations bucket, both, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Limit on bytes transferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Limit on requests, whatever their size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Checks both buckets. Error fields are relative to the rate limiter (`bandwidth.size`), so the
    /// caller adds where the rate limiter sits (e.g. `drives[0].rate_limiter`).
    pub fn validate(&self) -> Result<(), RateLimiterConfigError> {
        if let Some(bw) = &self.bandwidth {
            bw.validate(&BANDWIDTH_FIELDS)?;
        }
        if let Some(ops) = &self.ops {
            ops.validate(&OPS_FIELDS)?;
        }
        Ok(())
    }

    /// The bandwidth bucket if it limits anything (absent and all-zero buckets both mean unlimited).
    pub fn enabled_bandwidth(&self) -> Option<&TokenBucketConfig> {
        self.bandwidth.as_ref().filter(|b| b.is_enabled())
    }

    /// The operations bucket if it limits anything.
    pub fn enabled_ops(&self) -> Option<&TokenBucketConfig> {
        self.ops.as_ref().filter(|b| b.is_enabled())
    }

    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.enabled_bandwidth().is_none() && self.enabled_ops().is_none()
    }

    /// Builds a configuration from the command-line keys `bw`, `bw_burst`, `iops` and `iops_burst`
    /// (see the [module documentation](self) for their meaning); `None` means the key was not given.
    /// The result is validated. Missing or zero rates give no bucket.
    pub fn from_cli_keys(
        bw: Option<&str>,
        bw_burst: Option<&str>,
        iops: Option<&str>,
        iops_burst: Option<&str>,
    ) -> Result<Self, RateLimiterConfigError> {
        let bandwidth = cli_bucket(("bw", bw), ("bw_burst", bw_burst), parse_bytes)?;
        let ops = cli_bucket(("iops", iops), ("iops_burst", iops_burst), parse_count)?;
        let config = RateLimiterConfig { bandwidth, ops };
        config.validate()?;
        Ok(config)
    }
}

/// Collects the rate-limit keys of a device flag while the flag's other keys are parsed elsewhere:
///
/// ```
/// # use vmm_api::rate_limiter::RateLimiterCliKeys;
/// let mut limits = RateLimiterCliKeys::default();
/// for kv in "path=disk.img,bw=1M,iops=100".split(',') {
///     let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
///     if limits.set(key, value)? {
///         continue;
///     }
///     // ... handle the device's own keys ...
/// }
/// let config = limits.to_config()?;
/// assert_eq!(config.bandwidth.unwrap().size, 1 << 20);
/// # Ok::<(), vmm_api::rate_limiter::RateLimiterConfigError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimiterCliKeys<'a> {
    /// Value of `bw`.
    pub bw: Option<&'a str>,
    /// Value of `bw_burst`.
    pub bw_burst: Option<&'a str>,
    /// Value of `iops`.
    pub iops: Option<&'a str>,
    /// Value of `iops_burst`.
    pub iops_burst: Option<&'a str>,
}

impl<'a> RateLimiterCliKeys<'a> {
    /// The keys this type recognises.
    pub const KEYS: [&'static str; 4] = ["bw", "bw_burst", "iops", "iops_burst"];

    /// Records `key=value` and returns `Ok(true)` if `key` is a rate-limit key, `Ok(false)` if it is
    /// not (the caller handles it). A key given twice is an error rather than last-one-wins, since the
    /// user probably meant something else by one of them.
    pub fn set(&mut self, key: &str, value: &'a str) -> Result<bool, RateLimiterConfigError> {
        let (name, slot) = match key {
            "bw" => ("bw", &mut self.bw),
            "bw_burst" => ("bw_burst", &mut self.bw_burst),
            "iops" => ("iops", &mut self.iops),
            "iops_burst" => ("iops_burst", &mut self.iops_burst),
            _ => return Ok(false),
        };
        if slot.is_some() {
            return Err(cli_err(name, "given more than once".into()));
        }
        *slot = Some(value);
        Ok(true)
    }

    /// The configuration these keys describe; see [`RateLimiterConfig::from_cli_keys`].
    pub fn to_config(&self) -> Result<RateLimiterConfig, RateLimiterConfigError> {
        RateLimiterConfig::from_cli_keys(self.bw, self.bw_burst, self.iops, self.iops_burst)
    }
}

type CliKey<'a> = (&'static str, Option<&'a str>);

fn cli_bucket(
    (rate_key, rate): CliKey,
    (burst_key, burst): CliKey,
    parse: fn(&'static str, &str) -> Result<u64, RateLimiterConfigError>,
) -> Result<Option<TokenBucketConfig>, RateLimiterConfigError> {
    let rate = rate.map(|v| parse(rate_key, v)).transpose()?.unwrap_or(0);
    let burst = burst.map(|v| parse(burst_key, v)).transpose()?.unwrap_or(0);
    if rate == 0 {
        // A burst without a rate would be a bucket that never refills, which the JSON form rejects too.
        if burst != 0 {
            return Err(cli_err(burst_key, format!("needs a non-zero `{rate_key}`")));
        }
        return Ok(None);
    }
    Ok(Some(TokenBucketConfig::per_second(rate, burst)))
}

/// Parses a byte count: decimal digits with an optional `K`, `M` or `G` (powers of 1024) suffix.
fn parse_bytes(key: &'static str, value: &str) -> Result<u64, RateLimiterConfigError> {
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K' | b'k') => (&value[..value.len() - 1], 10),
        Some(b'M' | b'm') => (&value[..value.len() - 1], 20),
        Some(b'G' | b'g') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    let n = parse_count(key, digits)?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| cli_err(key, format!("`{value}` is too large")))
}

/// Parses a plain decimal count.
fn parse_count(key: &'static str, value: &str) -> Result<u64, RateLimiterConfigError> {
    // `u64::from_str` accepts a leading `+`; insist on digits only so that odd input is reported.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(cli_err(
            key,
            format!("expected a non-negative integer, got `{value}`"),
        ));
    }
    value
        .parse()
        .map_err(|_| cli_err(key, format!("`{value}` is too large")))
}

fn cli_err(key: &'static str, reason: String) -> RateLimiterConfigError {
    RateLimiterConfigError::Cli { key, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, one_time_burst: u64, refill_time_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst,
            refill_time_ms,
        }
    }

    #[test]
    fn parses_json_with_defaults_and_round_trips() {
        let c: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1048576, "refill_time_ms": 100},
                "ops": {"size": 10, "one_time_burst": 5, "refill_time_ms": 1000}}"#,
        )
        .unwrap();
        assert_eq!(c.bandwidth, Some(bucket(1 << 20, 0, 100)));
        assert_eq!(c.ops, Some(bucket(10, 5, 1000)));
        c.validate().unwrap();
        let again: RateLimiterConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);

        let empty: RateLimiterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, RateLimiterConfig::default());
        assert!(empty.is_unlimited());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");
    }

    #[test]
    fn rejects_unknown_fields() {
        for json in [
            r#"{"bandwidth": {"size": 1, "refill_time_ms": 1}, "iops": {}}"#,
            r#"{"bandwidth": {"size": 1, "refill_time": 1}}"#,
        ] {
            let err = serde_json::from_str::<RateLimiterConfig>(json).unwrap_err();
            assert!(err.to_string().contains("unknown field"), "{json}: {err}");
        }
    }

    #[test]
    fn all_zero_bucket_means_unlimited() {
        let c = RateLimiterConfig {
            bandwidth: Some(bucket(0, 0, 0)),
            ops: None,
        };
        c.validate().unwrap();
        assert!(c.is_unlimited());
        assert_eq!(c.enabled_bandwidth(), None);

        let c = RateLimiterConfig {
            bandwidth: Some(bucket(0, 0, 0)),
            ops: Some(bucket(5, 0, 10)),
        };
        assert!(!c.is_unlimited());
        assert_eq!(c.enabled_ops(), Some(&bucket(5, 0, 10)));
    }

    #[test]
    fn validate_names_the_field() {
        let cases = [
            (Some(bucket(0, 0, 100)), None, "bandwidth.size"),
            (Some(bucket(100, 0, 0)), None, "bandwidth.refill_time_ms"),
            (Some(bucket(0, 7, 0)), None, "bandwidth.size"),
            (None, Some(bucket(0, 0, 1)), "ops.size"),
            (None, Some(bucket(1, 0, 0)), "ops.refill_time_ms"),
            (
                None,
                Some(bucket(1, 0, MAX_REFILL_TIME_MS + 1)),
                "ops.refill_time_ms",
            ),
        ];
        for (bandwidth, ops, field) in cases {
            let err = RateLimiterConfig { bandwidth, ops }.validate().unwrap_err();
            assert!(
                matches!(&err, RateLimiterConfigError::Invalid { field: f, .. } if *f == field),
                "{err}"
            );
            assert!(err.to_string().starts_with(field), "{err}");
        }
        // The extremes that are allowed.
        RateLimiterConfig {
            bandwidth: Some(bucket(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS)),
            ops: Some(bucket(1, 0, 1)),
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn cli_keys_build_per_second_buckets() {
        let c =
            RateLimiterConfig::from_cli_keys(Some("10485760"), Some("1G"), Some("1000"), Some("50")).unwrap();
        assert_eq!(c.bandwidth, Some(bucket(10 << 20, 1 << 30, 1000)));
        assert_eq!(c.ops, Some(bucket(1000, 50, 1000)));

        let c = RateLimiterConfig::from_cli_keys(Some("4k"), None, None, None).unwrap();
        assert_eq!(c.bandwidth, Some(bucket(4096, 0, 1000)));
        assert_eq!(c.ops, None);

        let c = RateLimiterConfig::from_cli_keys(Some("0"), None, Some("0"), None).unwrap();
        assert!(c.is_unlimited());
        assert_eq!(c, RateLimiterConfig::default());
        assert_eq!(
            RateLimiterConfig::from_cli_keys(None, None, None, None).unwrap(),
            RateLimiterConfig::default()
        );
    }

    #[test]
    fn cli_keys_reject_bad_values_naming_the_key() {
        let cases: [([Option<&str>; 4], &str); 9] = [
            ([Some(""), None, None, None], "bw"),
            ([Some("-1"), None, None, None], "bw"),
            ([Some("+1"), None, None, None], "bw"),
            ([Some("1.5M"), None, None, None], "bw"),
            ([Some("99999999999999999999"), None, None, None], "bw"),
            ([Some("17179869184G"), None, None, None], "bw"),
            ([None, Some("1M"), None, None], "bw_burst"),
            ([None, None, Some("1k"), None], "iops"),
            ([None, None, Some("0"), Some("5")], "iops_burst"),
        ];
        for ([bw, bw_burst, iops, iops_burst], key) in cases {
            let err = RateLimiterConfig::from_cli_keys(bw, bw_burst, iops, iops_burst).unwrap_err();
            assert!(
                matches!(&err, RateLimiterConfigError::Cli { key: k, .. } if *k == key),
                "{bw:?} {bw_burst:?} {iops:?} {iops_burst:?}: {err}"
            );
        }
    }

    #[test]
    fn cli_key_collector_routes_and_rejects_repeats() {
        let mut keys = RateLimiterCliKeys::default();
        assert!(!keys.set("path", "/disk.img").unwrap());
        assert!(keys.set("iops", "200").unwrap());
        assert!(keys.set("bw_burst", "1M").unwrap());
        assert!(keys.set("bw", "2M").unwrap());
        let err = keys.set("iops", "300").unwrap_err();
        assert_eq!(err.to_string(), "iops: given more than once");
        let c = keys.to_config().unwrap();
        assert_eq!(c.bandwidth, Some(bucket(2 << 20, 1 << 20, 1000)));
        assert_eq!(c.ops, Some(bucket(200, 0, 1000)));
        for key in RateLimiterCliKeys::KEYS {
            assert!(RateLimiterCliKeys::default().set(key, "1").unwrap(), "{key}");
        }
    }
}
