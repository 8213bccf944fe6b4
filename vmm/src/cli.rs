//! Command-line parsing: `vmm --config vm.json`, or the same settings as flags.

use std::path::PathBuf;

use crate::inherited_fds::{InheritedFd, InheritedFdError};
use crate::seccomp::SeccompMode;
use vmm_api::{
    config::default_cmdline, BalloonConfig, BootSource, ConfigError, DriveConfig, HugePages, MachineConfig,
    NetConfig, SerialConfig, VmConfig,
};

/// Usage text for `--help`.
pub const USAGE: &str = "\
usage: vmm --config vm.json [--api-sock PATH]
       vmm --kernel PATH [--initrd PATH] [--cmdline STRING] [--vcpus N] [--memory-mib N]
           [--track-dirty-pages on|off] [--mergeable on|off] [--hugepages auto|off|thp] [--balloon SPEC]
           [--serial stdout|off|file:PATH] [--drive SPEC]... [--net SPEC]... [--api-sock PATH]
       vmm --api-sock PATH          (empty: configure, add-fds and start through the socket)
       (every form also takes [--seccomp kill|log|off] [--fd NAME=N]...)

Boots one virtual machine on /dev/kvm and exits when the guest powers off or reboots (code 0),
panics (2) or a vCPU fails (3); configuration and setup errors exit with 1.

  --config PATH      VM configuration as JSON (see README.md); excludes the flags below
  --kernel PATH      ELF vmlinux (PVH or 64-bit entry) or bzImage
  --initrd PATH      initrd / initramfs image
  --cmdline STRING   kernel command line (default: \"console=ttyS0 reboot=k panic=1 pci=off\")
  --vcpus N          number of vCPUs, 1-32 (default 1)
  --memory-mib N     guest memory in MiB (default 128)
  --track-dirty-pages on|off
                     track pages written since the last snapshot, for diff snapshots (default off)
  --mergeable on|off offer guest memory to the host's KSM (MADV_MERGEABLE; default off)
  --hugepages MODE   transparent huge pages for guest memory: auto (default: MADV_HUGEPAGE after
                     the kernel loads, best effort), off, thp (2 MiB-aligned and advised from the
                     start; fails if the host refuses)
  --balloon SPEC     a virtio-balloon: amount_mib=N[,deflate_on_oom=on][,stats_interval_s=N]
                     [,free_page_reporting=on] (target changed at run time with update-balloon)
  --serial WHERE     guest serial console: stdout (default), off, or file:PATH
  --drive SPEC       a virtio-blk drive (repeatable; /dev/vda, /dev/vdb, ... in order, root first):
                     path=IMAGE|fd=NAME[,id=NAME][,ro=on][,root=on][,serial=S][,engine=uring|sync]
                     [,cache=writeback|none]
                     [,bw=BYTES_PER_S][,bw_burst=BYTES][,iops=N][,iops_burst=N]
  --net SPEC         a virtio-net NIC on an existing TAP device (repeatable; eth0, eth1, ... in order):
                     tap=NAME|fd=NAME[,mac=02:00:00:00:00:01][,id=NAME]
                     [,rx_bw=..][,rx_iops=..][,tx_bw=..][,tx_iops=..] (and _burst variants)
  --api-sock PATH    serve the control socket (newline-delimited JSON, see README.md) at PATH, which
                     must not exist; removed when the VMM exits. Alone, the VMM starts empty and
                     waits for `configure` and `start` requests
  --fd NAME=N        take over descriptor N (3 or above, open: the parent left it open across
                     exec) as if add-fds had passed it as NAME (repeatable; the same name rules and
                     limit), so that a drive's or NIC's fd=NAME, in --config, the flags or a later
                     configure, names it. Taken before anything else is opened, and made
                     close-on-exec; with --jail only the jailed VMM keeps it, not the launcher
  --seccomp MODE     what a thread's seccomp filter does with a system call outside its list:
                     kill (default: the process dies with SIGSYS), log (allowed, logged by the
                     kernel's audit, type=1326), off (no filters)
  --jail DIR         run jailed (docs/jail.md): DIR (absolute, absent or empty) becomes the VMM's
                     root; with --uid N --gid N (non-zero), optionally --jail-id NAME (default: DIR's
                     last component), --netns PATH, --cpu-limit CORES (e.g. 1.5), --memory-limit-mib N,
                     --pids-limit N (default 128), --nofile N (default 1024). --api-sock and
                     --serial file: paths must then lie in a directory under DIR. Also for the
                     empty start mode (only --api-sock): --jail-mirror PATH (repeatable) shows a
                     host file or directory read-only at its own path in the jail, for a snapshot
                     restore or migration that names host paths (disks and taps come as --fd)
  -h, --help         this text
  -V, --version      version";

/// What the command line asks for.
/// Process options that are not part of the VM's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Where to serve the control socket.
    pub api_sock: Option<PathBuf>,
    /// What the per-thread seccomp filters do with a call outside their lists.
    pub seccomp: SeccompMode,
    /// Run jailed (`--jail DIR ...`, see [`crate::jail`]).
    pub jail: Option<Box<crate::jail::JailConfig>>,
    /// Descriptors inherited from the parent (`--fd NAME=N`), to take before anything else opens
    /// files (see [`crate::inherited_fds`]).
    pub inherited_fds: Vec<InheritedFd>,
    /// Not a flag: set by the jail, which rewrites the configuration to in-jail paths, to the
    /// configuration as given, whose paths are the host's (see [`crate::machine::Machine::recorded_config`]).
    pub host_config: Option<Box<VmConfig>>,
}

// Parsed once per process: boxing the configuration would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Boot this VM, or (none) wait for a configuration on the control socket.
    Run(Option<VmConfig>, RunOptions),
    /// Print usage.
    Help,
    /// Print the version.
    Version,
}

/// Command-line errors.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An unknown flag.
    #[error("unknown argument '{0}' (see --help)")]
    Unknown(String),
    /// A flag without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("invalid value '{value}' for {flag}: {reason}")]
    BadValue {
        /// The flag.
        flag: String,
        /// The value given.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// A flag given twice.
    #[error("{0} given more than once")]
    Repeated(String),
    /// `--config` mixed with VM flags.
    #[error("--config cannot be combined with {0}")]
    ConfigAndFlags(String),
    /// Neither `--config` nor `--kernel` (nor `--api-sock` to be configured through).
    #[error("nothing to boot: give --config FILE or --kernel PATH, or --api-sock PATH to configure it later (see --help)")]
    NothingToBoot,
    /// A VM flag in the empty start mode.
    #[error("{0} needs --kernel (a VMM started with only --api-sock is configured through the socket)")]
    WithoutKernel(String),
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    ReadConfig {
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--fd` values that do not parse or clash.
    #[error(transparent)]
    Fd(#[from] InheritedFdError),
}

#[derive(Default)]
struct Flags {
    config: Option<String>,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    vcpus: Option<String>,
    memory_mib: Option<String>,
    track_dirty_pages: Option<String>,
    mergeable: Option<String>,
    hugepages: Option<String>,
    balloon: Option<String>,
    serial: Option<String>,
    drives: Vec<String>,
    nets: Vec<String>,
    fds: Vec<String>,
    api_sock: Option<String>,
    seccomp: Option<String>,
    jail: crate::jail::JailFlags,
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let mut flags = Flags::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let slot = match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--config" => &mut flags.config,
            "--kernel" => &mut flags.kernel,
            "--initrd" => &mut flags.initrd,
            "--cmdline" => &mut flags.cmdline,
            "--vcpus" => &mut flags.vcpus,
            "--memory-mib" => &mut flags.memory_mib,
            "--track-dirty-pages" => &mut flags.track_dirty_pages,
            "--mergeable" => &mut flags.mergeable,
            "--hugepages" => &mut flags.hugepages,
            "--balloon" => &mut flags.balloon,
            "--serial" => &mut flags.serial,
            "--api-sock" => &mut flags.api_sock,
            "--seccomp" => &mut flags.seccomp,
            "--drive" | "--net" | "--fd" | "--jail-mirror" => {
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or_else(|| CliError::MissingValue(name.clone()))?,
                };
                match name.as_str() {
                    "--drive" => flags.drives.push(value),
                    "--net" => flags.nets.push(value),
                    "--fd" => flags.fds.push(value),
                    _ => flags.jail.mirrors.push(value),
                }
                continue;
            }
            other => match flags.jail.slot(other) {
                Some(slot) => slot,
                None => return Err(CliError::Unknown(arg)),
            },
        };
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| CliError::MissingValue(name.clone()))?,
        };
        if slot.replace(value).is_some() {
            return Err(CliError::Repeated(name));
        }
    }
    let api_sock = flags.api_sock.clone().map(PathBuf::from);
    let seccomp = match flags.seccomp.take() {
        Some(value) => value
            .parse()
            .map_err(|e: crate::seccomp::SeccompError| CliError::BadValue {
                flag: "--seccomp".into(),
                value,
                reason: e.to_string(),
            })?,
        None => SeccompMode::default(),
    };
    let jail = std::mem::take(&mut flags.jail).into_config()?;
    let inherited_fds = crate::inherited_fds::parse(&flags.fds)?;
    let options = RunOptions {
        api_sock,
        seccomp,
        jail,
        inherited_fds,
        host_config: None,
    };
    let nothing_to_boot = flags.config.is_none() && flags.kernel.is_none();
    if nothing_to_boot && options.api_sock.is_some() {
        // Started empty: the configuration comes over the control socket.
        let stray = [
            ("--initrd", &flags.initrd),
            ("--cmdline", &flags.cmdline),
            ("--vcpus", &flags.vcpus),
            ("--memory-mib", &flags.memory_mib),
            ("--track-dirty-pages", &flags.track_dirty_pages),
            ("--mergeable", &flags.mergeable),
            ("--hugepages", &flags.hugepages),
            ("--balloon", &flags.balloon),
            ("--serial", &flags.serial),
        ];
        if let Some((flag, _)) = stray.iter().find(|(_, v)| v.is_some()) {
            return Err(CliError::WithoutKernel((*flag).to_string()));
        }
        if !flags.drives.is_empty() {
            return Err(CliError::WithoutKernel("--drive".to_string()));
        }
        if !flags.nets.is_empty() {
            return Err(CliError::WithoutKernel("--net".to_string()));
        }
        return Ok(Command::Run(None, options));
    }
    build(flags).map(|config| Command::Run(Some(config), options))
}

fn build(flags: Flags) -> Result<VmConfig, CliError> {
    if let Some(path) = flags.config {
        let given = [
            ("--kernel", &flags.kernel),
            ("--initrd", &flags.initrd),
            ("--cmdline", &flags.cmdline),
            ("--vcpus", &flags.vcpus),
            ("--memory-mib", &flags.memory_mib),
            ("--track-dirty-pages", &flags.track_dirty_pages),
            ("--mergeable", &flags.mergeable),
            ("--hugepages", &flags.hugepages),
            ("--balloon", &flags.balloon),
            ("--serial", &flags.serial),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, v)| v.is_some()) {
            return Err(CliError::ConfigAndFlags((*flag).to_string()));
        }
        if !flags.drives.is_empty() {
            return Err(CliError::ConfigAndFlags("--drive".to_string()));
        }
        if !flags.nets.is_empty() {
            return Err(CliError::ConfigAndFlags("--net".to_string()));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| CliError::ReadConfig { path, source })?;
        return Ok(VmConfig::from_json(&text)?);
    }
    let kernel = flags.kernel.ok_or(CliError::NothingToBoot)?;
    let defaults = MachineConfig::default();
    let config = VmConfig {
        boot: BootSource {
            kernel: PathBuf::from(kernel),
            initrd: flags.initrd.map(PathBuf::from),
            cmdline: flags.cmdline.unwrap_or_else(default_cmdline),
        },
        machine: MachineConfig {
            vcpus: number("--vcpus", flags.vcpus)?.unwrap_or(defaults.vcpus),
            memory_mib: number("--memory-mib", flags.memory_mib)?.unwrap_or(defaults.memory_mib),
            track_dirty_pages: on_off("--track-dirty-pages", flags.track_dirty_pages.as_deref())?,
            mergeable: on_off("--mergeable", flags.mergeable.as_deref())?,
            hugepages: match flags.hugepages.as_deref() {
                None | Some("auto") => HugePages::Auto,
                Some("off") => HugePages::Off,
                Some("thp") => HugePages::Thp,
                Some(other) => {
                    return Err(CliError::BadValue {
                        flag: "--hugepages".into(),
                        value: other.into(),
                        reason: "expected auto, off or thp".into(),
                    })
                }
            },
            balloon: flags
                .balloon
                .map(|spec| {
                    BalloonConfig::from_cli(&spec).map_err(|reason| CliError::BadValue {
                        flag: "--balloon".into(),
                        value: spec.clone(),
                        reason,
                    })
                })
                .transpose()?,
        },
        serial: flags.serial.map(serial).transpose()?.unwrap_or_default(),
        drives: flags
            .drives
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                DriveConfig::from_cli(&spec, i).map_err(|reason| CliError::BadValue {
                    flag: "--drive".into(),
                    value: spec.clone(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?,
        nets: flags
            .nets
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                NetConfig::from_cli(&spec, i).map_err(|reason| CliError::BadValue {
                    flag: "--net".into(),
                    value: spec.clone(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?,
    };
    config.validate()?;
    Ok(config)
}

fn on_off(flag: &str, value: Option<&str>) -> Result<bool, CliError> {
    match value {
        None | Some("off") => Ok(false),
        Some("on") => Ok(true),
        Some(other) => Err(CliError::BadValue {
            flag: flag.into(),
            value: other.into(),
            reason: "expected on or off".into(),
        }),
    }
}

fn number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<Option<T>, CliError>
where
    T::Err: std::fmt::Display,
{
    value
        .map(|v| {
            v.parse().map_err(|e: T::Err| CliError::BadValue {
                flag: flag.to_string(),
                value: v.clone(),
                reason: e.to_string(),
            })
        })
        .transpose()
}

fn serial(value: String) -> Result<SerialConfig, CliError> {
    match value.as_str() {
        "stdout" => Ok(SerialConfig::Stdout),
        "off" => Ok(SerialConfig::Off),
        v => match v.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
            _ => Err(CliError::BadValue {
                flag: "--serial".into(),
                value,
                reason: "expected stdout, off or file:PATH".into(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_build_a_config() {
        let Command::Run(Some(c), _) = parse(args(
            "--kernel /k --initrd=/i --vcpus 4 --memory-mib 3584 --serial file:/tmp/c",
        ))
        .unwrap() else {
            panic!("expected run")
        };
        assert_eq!(c.boot.kernel, PathBuf::from("/k"));
        assert_eq!(c.boot.initrd, Some(PathBuf::from("/i")));
        assert_eq!(c.boot.cmdline, default_cmdline());
        assert_eq!(
            c.machine,
            MachineConfig {
                vcpus: 4,
                memory_mib: 3584,
                ..MachineConfig::default()
            }
        );
        assert_eq!(c.serial, SerialConfig::File("/tmp/c".into()));
        assert!(c.drives.is_empty());
        assert_eq!(parse(args("--help")).unwrap(), Command::Help);

        let Command::Run(Some(c), _) =
            parse(args("--kernel /k --drive path=/a,id=a --drive=path=/b,ro=on")).unwrap()
        else {
            panic!("expected run")
        };
        assert_eq!(c.drives.len(), 2);
        assert_eq!(
            (c.drives[0].id.as_str(), c.drives[1].id.as_str()),
            ("a", "drive1")
        );
        assert!(c.drives[1].read_only);

        let Command::Run(None, options) = parse(args("--api-sock /run/v.sock")).unwrap() else {
            panic!("expected an empty start")
        };
        assert_eq!(options.api_sock, Some(PathBuf::from("/run/v.sock")));
    }

    #[test]
    fn memory_flags_build_the_machine_options() {
        let Command::Run(Some(c), _) = parse(args(
            "--kernel /k --memory-mib 256 --mergeable on --hugepages thp \
             --balloon amount_mib=64,deflate_on_oom=on,stats_interval_s=1,free_page_reporting=on",
        ))
        .unwrap() else {
            panic!("expected run")
        };
        assert!(c.machine.mergeable);
        assert_eq!(c.machine.hugepages, HugePages::Thp);
        let b = c.machine.balloon.unwrap();
        assert_eq!((b.amount_mib, b.stats_interval_s), (64, 1));
        assert!(b.deflate_on_oom && b.free_page_reporting);
        for (line, expected) in [
            (
                "--kernel /k --hugepages always",
                "invalid value 'always' for --hugepages",
            ),
            ("--kernel /k --balloon size=1", "unknown key 'size'"),
            (
                "--kernel /k --memory-mib 64 --balloon amount_mib=65",
                "machine.balloon.amount_mib",
            ),
            ("--api-sock /s --balloon amount_mib=1", "--balloon needs --kernel"),
        ] {
            let err = parse(args(line)).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn fd_flags_name_inherited_descriptors() {
        let fd = |name: &str, fd| InheritedFd {
            name: name.into(),
            fd,
        };
        // The empty start: descriptors for a later `configure`.
        let Command::Run(None, options) = parse(args("--fd tap0=3 --api-sock /s --fd=disk=7")).unwrap()
        else {
            panic!("expected an empty start")
        };
        assert_eq!(options.inherited_fds, [fd("tap0", 3), fd("disk", 7)]);
        // Flags: NICs and drives name them with fd=.
        let Command::Run(Some(c), options) = parse(args(
            "--kernel /k --fd t=3 --net fd=t,id=eth0 --drive fd=d,id=data,ro=on --fd d=4",
        ))
        .unwrap() else {
            panic!("expected run")
        };
        assert_eq!(options.inherited_fds, [fd("t", 3), fd("d", 4)]);
        assert_eq!(
            (c.nets[0].tap.as_deref(), c.nets[0].fd.as_deref()),
            (None, Some("t"))
        );
        assert_eq!(c.drives[0].fd.as_deref(), Some("d"));
        assert!(c.drives[0].path.as_os_str().is_empty());
        // --config: --fd is not a VM setting, so it combines.
        let path = std::env::temp_dir().join(format!("vmm-cli-fd-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"boot": {"kernel": "/k"}, "nets": [{"id": "eth0", "fd": "tap0"}]}"#,
        )
        .unwrap();
        let parsed = parse(args(&format!("--config {} --fd tap0=5", path.display())));
        std::fs::remove_file(&path).unwrap();
        let Command::Run(Some(c), options) = parsed.unwrap() else {
            panic!("expected run")
        };
        assert_eq!(options.inherited_fds, [fd("tap0", 5)]);
        assert_eq!(c.nets[0].fd.as_deref(), Some("tap0"));
        assert!(parse(args("--kernel /k")).is_ok_and(|c| matches!(c,
            Command::Run(_, o) if o.inherited_fds.is_empty())));

        for (line, expected) in [
            ("--kernel /k --fd", "--fd needs a value"),
            (
                "--api-sock /s --fd tap0",
                "invalid value 'tap0' for --fd: expected NAME=N",
            ),
            ("--api-sock /s --fd t=1", "pass 3 or above"),
            (
                "--api-sock /s --fd t=3 --fd t=4",
                "--fd t=4: the name 't' is given more than once",
            ),
            (
                "--api-sock /s --fd a=3 --fd b=3",
                "--fd b=3: descriptor 3 is given more than once",
            ),
            ("--kernel /k --net id=x", "tap=NAME (or fd=NAME"),
            ("--kernel /k --drive id=x", "path=PATH (or fd=NAME"),
            (
                "--kernel /k --net tap=a,fd=b",
                "nets[0].tap: give exactly one of tap and fd",
            ),
            (
                "--kernel /k --drive path=/a,fd=b",
                "drives[0].fd: give either path or fd",
            ),
        ] {
            let err = parse(args(line)).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn seccomp_mode_defaults_to_kill() {
        let mode = |line: &str| match parse(args(line)).unwrap() {
            Command::Run(_, options) => options.seccomp,
            other => panic!("expected run, got {other:?}"),
        };
        assert_eq!(mode("--kernel /k"), SeccompMode::Kill);
        assert_eq!(mode("--kernel /k --seccomp=log"), SeccompMode::Log);
        assert_eq!(mode("--kernel /k --seccomp off"), SeccompMode::Off);
        assert_eq!(mode("--seccomp kill --kernel /k"), SeccompMode::Kill);
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        let cases = [
            ("--kernel /k --vcpus 0", "machine.vcpus"),
            ("--kernel /k --memory-mib 0", "machine.memory_mib"),
            ("--kernel /k --vcpus many", "invalid value 'many' for --vcpus"),
            ("--kernel /k --vcpus -1", "invalid value '-1' for --vcpus"),
            ("--kernel /k --serial tty", "invalid value 'tty' for --serial"),
            ("--kernel /k --bogus", "unknown argument '--bogus'"),
            (
                "--kernel /k --seccomp=allow",
                "invalid value 'allow' for --seccomp: unknown seccomp mode",
            ),
            ("--kernel /k --seccomp", "--seccomp needs a value"),
            ("--kernel", "--kernel needs a value"),
            ("--kernel /a --kernel /b", "--kernel given more than once"),
            (
                "--config /c --kernel /k",
                "--config cannot be combined with --kernel",
            ),
            ("--vcpus 2", "nothing to boot"),
            ("--api-sock /s --vcpus 2", "--vcpus needs --kernel"),
            ("--api-sock /s --drive path=/a", "--drive needs --kernel"),
            (
                "--kernel /k --drive id=x",
                "invalid value 'id=x' for --drive: path=PATH (or fd=NAME",
            ),
            (
                "--kernel /k --drive path=/a --drive path=/a,id=drive0",
                "duplicate drive id",
            ),
            (
                "--config /c --drive path=/a",
                "--config cannot be combined with --drive",
            ),
            (
                "--config /nonexistent/vm.json",
                "cannot read config /nonexistent/vm.json",
            ),
        ];
        for (line, expected) in cases {
            let err = parse(args(line)).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }
}
