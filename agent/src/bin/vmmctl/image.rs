//! `vmmctl image ...`: register (files on the agent's host), upload (files here, streamed),
//! list, show and delete base images.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Subcommand;
use ring::digest::{Context as Digest, SHA256};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use vmm_agent::proto::image_service_client::ImageServiceClient;
use vmm_agent::proto::{
    upload_image_request, DeleteImageRequest, GetImageRequest, Image, ImageFile, ImagePart,
    ListImagesRequest, RegisterImageRequest, UploadImageChunk, UploadImageHeader, UploadImageRequest,
};

use super::{labels_text, parse_kv, status};

/// Bytes per upload message (well under the agent's 4 MiB message limit).
const CHUNK: usize = 1 << 20;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Register an image from files on the agent's host (absolute paths; the agent copies them).
    Register {
        image_id: String,
        #[arg(long)]
        kernel: String,
        /// A raw disk image, its size a multiple of 512.
        #[arg(long)]
        rootfs: String,
        #[arg(long, default_value = "")]
        initrd: String,
        /// KEY=VALUE; may be repeated.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Upload an image from files on this machine, streamed to the agent (with SHA-256 checks).
    Upload {
        image_id: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        rootfs: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// KEY=VALUE; may be repeated.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Show one image.
    Get { image_id: String },
    /// List images.
    List {
        /// Label selector: k=v,k!=v,k,!k.
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Delete an image (refused while VMs or snapshots use it).
    Delete {
        image_id: String,
        #[arg(long, default_value = "")]
        request_id: String,
    },
}

fn file_json(f: &Option<ImageFile>) -> Value {
    match f {
        Some(f) => json!({"size_bytes": f.size_bytes, "sha256": f.sha256, "path": f.path}),
        None => Value::Null,
    }
}

fn image_json(i: &Image) -> Value {
    json!({
        "image_id": i.image_id, "kernel": file_json(&i.kernel), "rootfs": file_json(&i.rootfs),
        "initrd": file_json(&i.initrd), "create_time_ms": i.create_time_ms, "labels": i.labels,
        "vms_using": i.vms_using, "snapshots_using": i.snapshots_using,
    })
}

fn print_images(images: &[Image], as_json: bool) {
    if as_json {
        for i in images {
            println!("{}", image_json(i));
        }
        return;
    }
    let mib = |f: &Option<ImageFile>| match f {
        Some(f) => format!("{:.1}", f.size_bytes as f64 / f64::from(1 << 20)),
        None => "-".to_string(),
    };
    let short = |f: &Option<ImageFile>| {
        f.as_ref()
            .map_or("-".to_string(), |f| f.sha256.chars().take(12).collect())
    };
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:<12} {:>4} {:>5} LABELS",
        "ID", "KERNEL_MIB", "ROOTFS_MIB", "INITRD_MIB", "ROOTFS_SHA", "VMS", "SNAPS"
    );
    for i in images {
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:<12} {:>4} {:>5} {}",
            i.image_id,
            mib(&i.kernel),
            mib(&i.rootfs),
            mib(&i.initrd),
            short(&i.rootfs),
            i.vms_using,
            i.snapshots_using,
            labels_text(&i.labels)
        );
    }
}

/// A local file's length and SHA-256 (hex).
fn size_and_sha256(path: &Path) -> Result<(u64, String)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut digest = Digest::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        len += n as u64;
    }
    let hex = digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((len, hex))
}

/// Sends the chunks of `parts` (in order) into `tx`, counting bytes in `sent`.
fn send_parts(
    parts: Vec<(ImagePart, PathBuf)>,
    tx: tokio::sync::mpsc::Sender<UploadImageRequest>,
    sent: Arc<AtomicU64>,
) -> Result<()> {
    for (part, path) in parts {
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        loop {
            let mut data = vec![0u8; CHUNK];
            let n = file
                .read(&mut data)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            data.truncate(n);
            let message = UploadImageRequest {
                item: Some(upload_image_request::Item::Chunk(UploadImageChunk {
                    part: part as i32,
                    data,
                })),
            };
            // The call ended (the agent refused): its status says why.
            if tx.blocking_send(message).is_err() {
                return Ok(());
            }
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Streams the files to the agent, drawing the bytes sent on a terminal.
async fn upload(
    client: &mut ImageServiceClient<Channel>,
    mut header: UploadImageHeader,
    kernel: PathBuf,
    rootfs: PathBuf,
    initrd: Option<PathBuf>,
) -> Result<Image> {
    let mut parts = vec![(ImagePart::Kernel, kernel), (ImagePart::Rootfs, rootfs)];
    parts.extend(initrd.map(|p| (ImagePart::Initrd, p)));
    for (part, path) in &parts {
        let (size, sha) = size_and_sha256(path)?;
        match part {
            ImagePart::Kernel => (header.kernel_size, header.kernel_sha256) = (size, sha),
            ImagePart::Rootfs => (header.rootfs_size, header.rootfs_sha256) = (size, sha),
            _ => (header.initrd_size, header.initrd_sha256) = (size, sha),
        }
    }
    let total = header.kernel_size + header.rootfs_size + header.initrd_size;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(UploadImageRequest {
        item: Some(upload_image_request::Item::Header(header)),
    })
    .await?;
    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let sent = sent.clone();
        tokio::task::spawn_blocking(move || send_parts(parts, tx, sent))
    };
    let call = client.upload_image(ReceiverStream::new(rx));
    tokio::pin!(call);
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let answer = loop {
        tokio::select! {
            answer = &mut call => break answer,
            _ = tick.tick(), if tty => {
                let done = sent.load(Ordering::Relaxed);
                let percent = (100 * done).checked_div(total).unwrap_or(0);
                let filled = (percent as usize * 30 / 100).min(30);
                let mib = |b: u64| b as f64 / f64::from(1 << 20);
                eprint!(
                    "\rupload [{}{}] {percent:>3}% {:.1}/{:.1} MiB ",
                    "#".repeat(filled),
                    ".".repeat(30 - filled),
                    mib(done),
                    mib(total)
                );
                let _ = std::io::stderr().flush();
            }
        }
    };
    if tty {
        eprintln!();
    }
    // A local read error cuts the stream short: it says more than the agent's answer to that.
    producer.await??;
    Ok(answer.map_err(status)?.into_inner())
}

/// Runs one image subcommand.
pub async fn run(channel: Channel, cmd: ImageCmd, as_json: bool) -> Result<()> {
    let mut images = ImageServiceClient::new(channel);
    match cmd {
        ImageCmd::Register {
            image_id,
            kernel,
            rootfs,
            initrd,
            labels,
            request_id,
        } => {
            let image = images
                .register_image(RegisterImageRequest {
                    image_id,
                    kernel,
                    rootfs,
                    initrd,
                    labels: parse_kv("--label", &labels)?,
                    request_id,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_images(&[image], as_json);
        }
        ImageCmd::Upload {
            image_id,
            kernel,
            rootfs,
            initrd,
            labels,
            request_id,
        } => {
            let header = UploadImageHeader {
                image_id,
                labels: parse_kv("--label", &labels)?,
                request_id,
                ..Default::default()
            };
            let image = upload(&mut images, header, kernel, rootfs, initrd).await?;
            print_images(&[image], as_json);
        }
        ImageCmd::Get { image_id } => {
            let image = images
                .get_image(GetImageRequest { image_id })
                .await
                .map_err(status)?
                .into_inner();
            print_images(&[image], as_json);
        }
        ImageCmd::List { selector } => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = images
                    .list_images(ListImagesRequest {
                        label_selector: selector.clone(),
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                all.extend(page.images);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_images(&all, as_json);
        }
        ImageCmd::Delete { image_id, request_id } => {
            images
                .delete_image(DeleteImageRequest { image_id, request_id })
                .await
                .map_err(status)?;
        }
    }
    Ok(())
}
