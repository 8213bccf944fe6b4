//! QEMU's QMP: one JSON command per line; asynchronous `event` lines are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A QMP connection past the capabilities handshake.
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path` and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read_value()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read_value(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed QMP");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` without arguments and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value> {
        self.execute_with(command, None)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute_with(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let request = match arguments {
            Some(args) => json!({"execute": command, "arguments": args}),
            None => json!({"execute": command}),
        };
        writeln!(self.writer, "{request}")?;
        loop {
            let value = self.read_value()?;
            if value.get("event").is_some() {
                continue;
            }
            if let Some(ret) = value.get("return") {
                return Ok(ret.clone());
            }
            bail!("{command}: {value}");
        }
    }
}
