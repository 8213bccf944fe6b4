//! Command-line parsing shared by the benchmarks: `--flag value` pairs, where every error carries the
//! program's usage text so that a wrong invocation shows how to call it.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

/// Whether the command line asks for the usage text: the caller prints it and exits with 0.
pub fn wants_help() -> bool {
    std::env::args().skip(1).any(|a| a == "-h" || a == "--help")
}

/// The arguments of a benchmark (without the program name), taken flag by flag.
///
/// ```
/// # fn main() -> anyhow::Result<()> {
/// let mut args = benches::Args::new(["--runs", "3"], "usage: x [--runs N]");
/// let mut runs = 1;
/// while let Some(flag) = args.next_flag() {
///     match flag.as_str() {
///         "--runs" => runs = args.parse(&flag)?,
///         _ => return Err(args.unexpected(&flag)),
///     }
/// }
/// assert_eq!(runs, 3);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Args {
    args: std::vec::IntoIter<String>,
    usage: &'static str,
}

impl Args {
    /// Wraps `args`; `usage` goes into the errors.
    pub fn new<S: Into<String>>(args: impl IntoIterator<Item = S>, usage: &'static str) -> Args {
        Args {
            args: args.into_iter().map(Into::into).collect::<Vec<_>>().into_iter(),
            usage,
        }
    }

    /// The next flag, `None` at the end.
    pub fn next_flag(&mut self) -> Option<String> {
        self.args.next()
    }

    /// The value that follows `flag`.
    pub fn value(&mut self, flag: &str) -> Result<String> {
        self.args
            .next()
            .ok_or_else(|| anyhow!("{flag} needs a value\n{}", self.usage))
    }

    /// The value that follows `flag`, parsed; a bad one is reported with the flag's name.
    pub fn parse<T>(&mut self, flag: &str) -> Result<T>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.value(flag)?.parse().with_context(|| flag.to_string())
    }

    /// The value that follows `flag` as a path.
    pub fn path(&mut self, flag: &str) -> Result<PathBuf> {
        self.value(flag).map(PathBuf::from)
    }

    /// The value that follows `flag` as a whole number of seconds.
    pub fn secs(&mut self, flag: &str) -> Result<Duration> {
        self.parse(flag).map(Duration::from_secs)
    }

    /// The value that follows `flag` as guest sizes `MIBxVCPUS,...` (e.g. `128x1,2048x2`).
    pub fn sizes(&mut self, flag: &str) -> Result<Vec<(u32, u32)>> {
        self.value(flag)?
            .split(',')
            .map(|s| {
                let (m, v) = s
                    .split_once('x')
                    .ok_or_else(|| anyhow!("{flag}: {s}: want MIBxVCPUS"))?;
                Ok((m.parse()?, v.parse()?))
            })
            .collect()
    }

    /// The error for a flag the program does not know: the usage text alone for `-h` / `--help`.
    pub fn unexpected(&self, flag: &str) -> anyhow::Error {
        match flag {
            "-h" | "--help" => anyhow!("{}", self.usage),
            other => anyhow!("unknown argument {other:?}\n{}", self.usage),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str = "usage: t [--n N]";

    #[test]
    fn values_and_errors() {
        let mut args = Args::new("--n 7 --t 2 --p /x --n".split_whitespace(), USAGE);
        assert_eq!(args.next_flag().as_deref(), Some("--n"));
        assert_eq!(args.parse::<u32>("--n").unwrap(), 7);
        args.next_flag();
        assert_eq!(args.secs("--t").unwrap(), Duration::from_secs(2));
        args.next_flag();
        assert_eq!(args.path("--p").unwrap(), PathBuf::from("/x"));
        assert_eq!(args.next_flag().as_deref(), Some("--n"));
        let e = args.value("--n").unwrap_err();
        assert_eq!(e.to_string(), format!("--n needs a value\n{USAGE}"));
        assert_eq!(args.next_flag(), None);

        let mut args = Args::new(["--n", "x"], USAGE);
        args.next_flag();
        let e = args.parse::<u32>("--n").unwrap_err();
        assert_eq!(format!("{e:#}"), "--n: invalid digit found in string");
        assert_eq!(args.unexpected("--help").to_string(), USAGE);
        assert_eq!(
            args.unexpected("--bogus").to_string(),
            format!("unknown argument \"--bogus\"\n{USAGE}")
        );
    }
}
