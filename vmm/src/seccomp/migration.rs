//! The allow-list of a migration thread: it streams guest memory and state over a connection it
//! was handed (source), or writes what it receives into guest memory (destination). The peer is
//! another host, so this is the thread that reads untrusted network input: it may only move bytes
//! on the fds it has (the connection, and the disk images it copies), sleep, and wake the main
//! loop.

use seccompiler::BackendError;

use super::{arg_eq, base_rules, rule, Rules};

pub(super) fn rules() -> Result<Rules, BackendError> {
    let mut r = base_rules()?;
    // The connection, and the main loop's doorbell eventfd.
    r.allow(libc::SYS_read);
    r.allow(libc::SYS_write);
    // What std's socket streams use for reading and writing.
    r.allow(libc::SYS_recvfrom);
    r.allow(libc::SYS_sendto);
    // Send and receive timeouts on the connection, nothing else.
    r.allow_if(
        libc::SYS_setsockopt,
        vec![
            rule(vec![
                arg_eq(1, libc::SOL_SOCKET as u64),
                arg_eq(2, libc::SO_RCVTIMEO as u64),
            ])?,
            rule(vec![
                arg_eq(1, libc::SOL_SOCKET as u64),
                arg_eq(2, libc::SO_SNDTIMEO as u64),
            ])?,
        ],
    );
    // Pacing to a bandwidth limit.
    r.allow(libc::SYS_clock_nanosleep);
    r.allow(libc::SYS_nanosleep);
    // Dropping the connection at the end.
    r.allow(libc::SYS_close);
    // TLS between hosts: the handshake draws randomness (ring reads the kernel's CSPRNG), and
    // rustls writes its records with vectored writes.
    r.allow(libc::SYS_getrandom);
    r.allow(libc::SYS_writev);
    // Live migration with local disks: the source reads the images (skipping holes), the
    // destination writes its copies and makes them durable before it takes the VM.
    r.allow(libc::SYS_pread64);
    r.allow(libc::SYS_lseek);
    r.allow(libc::SYS_pwrite64);
    r.allow(libc::SYS_fdatasync);
    // Admitted here only to fail with EACCES (see `refused`): glibc's allocator may try.
    r.allow(libc::SYS_open);
    r.allow(libc::SYS_openat);
    Ok(r)
}
