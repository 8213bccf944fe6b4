//! Bad input to `vmm`: each case is one clear error line and a non-zero exit, never a panic.

use std::path::Path;
use std::process::{Command, Output};

use harness::vmm_binary;

fn vmm(args: &[&str]) -> Output {
    Command::new(vmm_binary()).args(args).output().expect("run vmm")
}

fn assert_clean_error(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want exactly one error line, got: {stderr}");
    assert!(lines[0].starts_with("vmm: error: "), "{stderr}");
    assert!(lines[0].contains(expected), "want '{expected}' in: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

fn write_temp(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}

#[test]
fn missing_kernel_file() {
    assert_clean_error(
        &vmm(&["--kernel", "/nonexistent/vmlinux"]),
        "cannot open kernel /nonexistent/vmlinux",
    );
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    let junk = write_temp("junk-kernel", &[0x5a; 8192]);
    assert_clean_error(
        &vmm(&["--kernel", junk.to_str().unwrap()]),
        "neither an x86_64 ELF vmlinux nor a bzImage",
    );
    let empty = write_temp("empty-kernel", b"");
    assert_clean_error(&vmm(&["--kernel", empty.to_str().unwrap()]), "kernel");
}

#[test]
fn zero_vcpus_and_zero_memory() {
    assert_clean_error(
        &vmm(&["--kernel", "/k", "--vcpus", "0"]),
        "machine.vcpus: must be 1 to 32, got 0",
    );
    assert_clean_error(
        &vmm(&["--kernel", "/k", "--memory-mib", "0"]),
        "machine.memory_mib",
    );
}

#[test]
fn more_memory_than_the_host_has() {
    // Needs a real kernel file so that the memory check is what fails.
    let kernel = write_temp("tiny-kernel", &[0x5a; 16]);
    let out = vmm(&["--kernel", kernel.to_str().unwrap(), "--memory-mib", "100000000"]);
    assert_clean_error(&out, "exceeds the host's");
}

#[test]
fn unknown_json_field_and_malformed_json() {
    let unknown = write_temp(
        "unknown.json",
        br#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memory_mib": 64, "gpus": 1}}"#,
    );
    assert_clean_error(
        &vmm(&["--config", unknown.to_str().unwrap()]),
        "unknown field `gpus`",
    );
    let malformed = write_temp("malformed.json", br#"{"boot": {"kernel": "/k""#);
    assert_clean_error(
        &vmm(&["--config", malformed.to_str().unwrap()]),
        "invalid VM config",
    );
    assert!(Path::new(&malformed).exists());
}
