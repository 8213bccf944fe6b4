//! `vmm`: one process per virtual machine. See `vmm --help`.

use std::io::Write;
use std::time::Instant;

use vmm::cli::{self, Command, RunOptions};
use vmm::device_manager::PassedFds;
use vmm::jail::Entered;
use vmm_api::VmConfig;

fn main() {
    // Taken first thing so that "booted in" and "first KVM_RUN" are measured from process start.
    let process_start = Instant::now();
    vmm::logger::init();
    // Parsing opens nothing that stays open (a `--config` file is read and closed): descriptor
    // numbers the parent left open for `--fd` are still exactly the ones open now.
    let code = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            0
        }
        Ok(Command::Version) => {
            println!("{}", vmm_api::snapshot::version_line(env!("CARGO_PKG_VERSION")));
            0
        }
        Ok(Command::Run(config, options)) => match vmm::inherited_fds::take(&options.inherited_fds) {
            Ok(fds) => start(config, options, fds, process_start),
            Err(e) => {
                eprintln!("vmm: error: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("vmm: error: {e}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    // vCPU threads may still be inside KVM_RUN; exiting the process stops them.
    std::process::exit(code);
}

/// Runs the VM, jailed first if asked, with the `--fd` descriptors already taken.
fn start(config: Option<VmConfig>, options: RunOptions, fds: PassedFds, process_start: Instant) -> i32 {
    // With --jail this forks: the launcher gets its child's exit code, the child runs the VM.
    match vmm::jail::enter(config, options, fds) {
        Ok(Entered::Launcher(code)) => code,
        Ok(Entered::Vmm(config, options, fds)) => {
            // Only here: after the inherited descriptors are ours (no number they use is taken),
            // and, when jailed, in the jailed child with its own procfs, so that `/proc/self`
            // is this process and not the launcher it was forked from.
            vmm::metrics::init();
            run(config.map(|c| *c), &options, fds, process_start)
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            1
        }
    }
}

fn run(config: Option<VmConfig>, options: &RunOptions, fds: PassedFds, process_start: Instant) -> i32 {
    match vmm::runtime::run(config, options, fds, process_start) {
        Ok(exit) => {
            let code = exit.exit_code();
            if code == 0 {
                eprintln!("vmm: {exit}");
            } else {
                eprintln!("vmm: error: {exit}");
            }
            code
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            1
        }
    }
}
