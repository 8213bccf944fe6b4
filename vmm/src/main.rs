//! `vmm`: one process per virtual machine. See `vmm --help`.

use std::io::Write;
use std::time::Instant;

use vmm::cli::{self, Command, RunOptions};
use vmm::jail::Entered;
use vmm_api::VmConfig;

fn main() {
    // Taken first thing so that "booted in" and "first KVM_RUN" are measured from process start.
    let process_start = Instant::now();
    vmm::logger::init();
    vmm::metrics::init();
    let code = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            0
        }
        Ok(Command::Version) => {
            println!("{}", vmm_api::snapshot::version_line(env!("CARGO_PKG_VERSION")));
            0
        }
        // With --jail this forks: the launcher gets its child's exit code, the child runs the VM.
        Ok(Command::Run(config, options)) => match vmm::jail::enter(config, options) {
            Ok(Entered::Launcher(code)) => code,
            Ok(Entered::Vmm(config, options)) => run(config.map(|c| *c), &options, process_start),
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

fn run(config: Option<VmConfig>, options: &RunOptions, process_start: Instant) -> i32 {
    match vmm::runtime::run(config, options, process_start) {
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
