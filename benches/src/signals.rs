//! Cleanup when a benchmark is interrupted: Ctrl-C or `timeout`'s SIGTERM end the process without
//! running destructors, so the network namespaces (and the VMMs inside them) it made would stay.

use anyhow::{bail, Result};

/// Makes SIGINT and SIGTERM remove this process's network namespaces ([`harness::NetNs`]) and
/// their processes, then exit with 128 + the signal. Call it first in `main`, before any thread
/// starts: the threads inherit the blocked signals, and only the thread started here takes them.
pub fn clean_up_on_signals() -> Result<()> {
    let set = termination_signals();
    // SAFETY: `set` is an initialized signal set; this changes only the calling thread's mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` is initialized and `signal` is a valid place for the result.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                eprintln!("interrupted (signal {signal}): removing what this benchmark made");
                harness::NetNs::remove_all();
                std::process::exit(128 + signal);
            }
        })?;
    Ok(())
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before sigaddset reads it, and
    // both only write inside it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}
