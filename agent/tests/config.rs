//! The TOML configuration file of a real agent: its settings take effect (seen through GetHost),
//! flags override them, and unknown keys stop the agent with a message naming the key and line.

mod common;

use std::process::Command;

use anyhow::Result;
use common::{state_dir, Agent};
use vmm_agent::proto::host_service_client::HostServiceClient;
use vmm_agent::proto::GetHostRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_the_file_and_flags_override_them() -> Result<()> {
    let dir = state_dir("agent-conf")?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "vcpu_overcommit = 1\nreserve_vcpus = 1\n[labels]\nzone = \"file\"\nrack = \"r1\"\n",
    )?;
    let config_arg = config.display().to_string();
    let agent = Agent::start(dir.path(), &["--config", &config_arg, "--label", "zone=flag"])?;
    agent.wait_serving().await?;
    let host = HostServiceClient::new(agent.channel().await?)
        .get_host(GetHostRequest {})
        .await?
        .into_inner();
    assert_eq!(host.allocatable_vcpus, host.cpus - 1, "{host:?}");
    assert_eq!(host.labels.get("zone").map(String::as_str), Some("flag"));
    assert_eq!(host.labels.get("rack").map(String::as_str), Some("r1"));
    drop(agent);

    let agent = Agent::start(dir.path(), &["--config", &config_arg, "--vcpu-overcommit", "2"])?;
    agent.wait_serving().await?;
    let host = HostServiceClient::new(agent.channel().await?)
        .get_host(GetHostRequest {})
        .await?
        .into_inner();
    assert_eq!(host.allocatable_vcpus, 2 * host.cpus - 1, "{host:?}");
    assert_eq!(host.labels.get("zone").map(String::as_str), Some("file"));
    drop(agent);

    std::fs::write(&config, "vcpu_overcommit = 1\nreserve_vcpu = 1\n")?;
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-agent"))
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--vmm-bin")
        .arg(harness::vmm_binary())
        .args(["--config", &config_arg])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("unknown field `reserve_vcpu`"), "{stderr}");
    assert!(stderr.contains("(line 2)"), "{stderr}");
    Ok(())
}
