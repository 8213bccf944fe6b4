//! ImageService over real gRPC: registering by path and by streaming upload, digests, request-id
//! replays, every refusal with its code, use by VMs, what an agent restart keeps and clears
//! (`the_image_api_without_guests`); and a guest booted from an image, reading the base through
//! its copy-on-write overlay and keeping what it wrote through a stop, an agent crash and a
//! start while the image stays unchanged, then snapshotted and restored as a VM on the same image
//! (`a_guest_on_an_image_keeps_its_writes_in_its_overlay`).

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, Result};
use common::snapshots::{restored, snapshot_of};
use common::{probe_fields, probe_spec, state_dir, wait_console, wait_state, Agent, BOOT_TIMEOUT};
use harness::{crc32, GuestImages};
use tonic::transport::Channel;
use tonic::Code;
use vmm_agent::proto::image_service_client::ImageServiceClient;
use vmm_agent::proto::snapshot_service_client::SnapshotServiceClient;
use vmm_agent::proto::{
    upload_image_request, CreateSnapshotRequest, CreateVmRequest, DeleteImageRequest, DeleteSnapshotRequest,
    DeleteVmRequest, Disk, GetImageRequest, GetVmRequest, Image, ImagePart, ListImagesRequest,
    RegisterImageRequest, RestoreSnapshotRequest, StartVmRequest, StopVmRequest, UploadImageChunk,
    UploadImageHeader, UploadImageRequest, VmSpec, VmState,
};

fn sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A rootfs whose every 512-byte sector differs: 4 MiB, with a hole in the middle.
fn write_rootfs(path: &Path) -> Result<Vec<u8>> {
    let mut data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i / 512 % 251) as u8 ^ (i % 7) as u8)
        .collect();
    data[1 << 20..2 << 20].fill(0);
    std::fs::write(path, &data)?;
    Ok(data)
}

fn register(
    id: &str,
    kernel: &Path,
    rootfs: &Path,
    initrd: Option<&Path>,
    request_id: &str,
) -> RegisterImageRequest {
    let s = |p: &Path| p.display().to_string();
    RegisterImageRequest {
        image_id: id.into(),
        kernel: s(kernel),
        rootfs: s(rootfs),
        initrd: initrd.map(s).unwrap_or_default(),
        labels: HashMap::from([("os".to_string(), "probe".to_string())]),
        request_id: request_id.into(),
    }
}

fn chunk(part: ImagePart, data: &[u8]) -> UploadImageRequest {
    UploadImageRequest {
        item: Some(upload_image_request::Item::Chunk(UploadImageChunk {
            part: part as i32,
            data: data.to_vec(),
        })),
    }
}

fn header(h: UploadImageHeader) -> UploadImageRequest {
    UploadImageRequest {
        item: Some(upload_image_request::Item::Header(h)),
    }
}

/// Streams `messages` as one UploadImage call.
async fn upload(
    images: &mut ImageServiceClient<Channel>,
    messages: Vec<UploadImageRequest>,
) -> Result<Image, tonic::Status> {
    images
        .upload_image(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

/// The header and chunks (1 MiB) that upload these parts whole.
fn upload_messages(id: &str, parts: &[(ImagePart, &[u8])], with_digests: bool) -> Vec<UploadImageRequest> {
    let mut h = UploadImageHeader {
        image_id: id.into(),
        ..Default::default()
    };
    for (part, data) in parts {
        let digest = if with_digests { sha256(data) } else { String::new() };
        match part {
            ImagePart::Kernel => (h.kernel_size, h.kernel_sha256) = (data.len() as u64, digest),
            ImagePart::Rootfs => (h.rootfs_size, h.rootfs_sha256) = (data.len() as u64, digest),
            _ => (h.initrd_size, h.initrd_sha256) = (data.len() as u64, digest),
        }
    }
    let mut messages = vec![header(h)];
    for (part, data) in parts {
        for piece in data.chunks(1 << 20) {
            messages.push(chunk(*part, piece));
        }
    }
    messages
}

fn code_and_field<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> (Code, String) {
    let status = result.expect_err("the call should fail");
    let field = status.message().split(':').next().unwrap_or("").to_string();
    (status.code(), field)
}

/// A VM on `image_id` whose kernel the vmm refuses: it is FAILED at once, but exists.
fn image_vm_request(vm_id: &str, spec: VmSpec) -> CreateVmRequest {
    CreateVmRequest {
        vm_id: vm_id.into(),
        spec: Some(VmSpec {
            vcpus: 1,
            memory_mib: 64,
            ..spec
        }),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_api_without_guests() -> Result<()> {
    let dir = state_dir("img-api")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    // Not a kernel: VMs on this image fail at once, which is all this test needs.
    let kernel = src.join("kernel");
    std::fs::write(&kernel, vec![0x4bu8; 10_000])?;
    let rootfs = src.join("rootfs.img");
    let rootfs_data = write_rootfs(&rootfs)?;
    let initrd = src.join("initrd");
    std::fs::write(&initrd, b"an initrd")?;
    let mut agent = Agent::start(dir.path(), &["--image-max-bytes", "8388608"])?;
    agent.wait_serving().await?;
    let mut images = ImageServiceClient::new(agent.channel().await?);
    let mut vms = agent.vms().await?;

    // Registered by path: copied, hashed, read-only, sparse where the source has zeros.
    let first = images
        .register_image(register("base", &kernel, &rootfs, Some(&initrd), "reg-1"))
        .await?
        .into_inner();
    let rootfs_file = first.rootfs.clone().ok_or_else(|| anyhow!("no rootfs"))?;
    assert_eq!(rootfs_file.size_bytes, 4 << 20);
    assert_eq!(rootfs_file.sha256, sha256(&rootfs_data));
    assert_eq!(first.kernel.as_ref().map(|k| k.size_bytes), Some(10_000));
    assert_eq!(
        first.initrd.as_ref().map(|i| i.sha256.clone()),
        Some(sha256(b"an initrd"))
    );
    assert_eq!(first.labels["os"], "probe");
    let kept = dir.path().join("images/base/rootfs");
    assert_eq!(rootfs_file.path, kept.display().to_string());
    assert_eq!(std::fs::read(&kept)?, rootfs_data);
    let meta = std::fs::metadata(&kept)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert!(meta.blocks() * 512 <= 3 << 20, "the zeroed MiB is a hole");
    // Later changes to the operator's file do not reach the image.
    std::fs::write(&rootfs, vec![1u8; 4 << 20])?;
    assert_eq!(sha256(&std::fs::read(&kept)?), rootfs_file.sha256);
    // A retry answers the same; its request id for another request, or the id taken, is refused.
    let again = images
        .register_image(register("base", &kernel, &rootfs, Some(&initrd), "reg-1"))
        .await?
        .into_inner();
    assert_eq!(again, first);
    let (code, field) = code_and_field(
        images
            .register_image(register("other", &kernel, &rootfs, None, "reg-1"))
            .await,
    );
    assert_eq!((code, field.as_str()), (Code::InvalidArgument, "request_id"));
    let (code, _) = code_and_field(
        images
            .register_image(register("base", &kernel, &rootfs, None, ""))
            .await,
    );
    assert_eq!(code, Code::AlreadyExists);

    // Every invalid registration names its field.
    let odd = src.join("odd");
    std::fs::write(&odd, vec![1u8; 1000])?;
    let empty = src.join("empty");
    std::fs::write(&empty, b"")?;
    let big = src.join("big");
    std::fs::File::create(&big)?.set_len(16 << 20)?;
    let p = |s: &str| PathBuf::from(s);
    for (request, want) in [
        (register("Bad_Id", &kernel, &rootfs, None, ""), "image_id"),
        (register("x", &p("rel/kernel"), &rootfs, None, ""), "kernel"),
        (
            register("x", &p("/nonexistent/kernel"), &rootfs, None, ""),
            "kernel",
        ),
        (register("x", &src, &rootfs, None, ""), "kernel"),
        (register("x", &empty, &rootfs, None, ""), "kernel"),
        (register("x", &kernel, &empty, None, ""), "rootfs"),
        (register("x", &kernel, &odd, None, ""), "rootfs"),
        (register("x", &kernel, &big, None, ""), "rootfs"),
        (
            register("x", &kernel, &rootfs, Some(&p("/nonexistent/i")), ""),
            "initrd",
        ),
    ] {
        let (code, field) = code_and_field(images.register_image(request.clone()).await);
        assert_eq!(
            (code, field.as_str()),
            (Code::InvalidArgument, want),
            "{request:?}"
        );
    }

    // Uploaded: the same bytes give the same digests; a wrong digest, a short or long part, a
    // part not announced, a missing header or an oversized image are refused, leaving nothing.
    let kernel_data = vec![0x4bu8; 10_000];
    let parts: [(ImagePart, &[u8]); 2] = [
        (ImagePart::Kernel, &kernel_data),
        (ImagePart::Rootfs, &rootfs_data),
    ];
    let up = upload(&mut images, upload_messages("up", &parts, true)).await?;
    assert_eq!(up.rootfs.as_ref().map(|f| &f.sha256), Some(&rootfs_file.sha256));
    assert_eq!(
        up.kernel.as_ref().map(|f| &f.sha256),
        first.kernel.as_ref().map(|f| &f.sha256)
    );
    assert!(up.initrd.is_none());
    assert_eq!(std::fs::read(dir.path().join("images/up/rootfs"))?, rootfs_data);
    let mut wrong = upload_messages("bad", &parts, true);
    if let Some(upload_image_request::Item::Header(h)) = wrong[0].item.as_mut() {
        h.rootfs_sha256 = "0".repeat(64);
    }
    let mut short = upload_messages("bad", &parts, false);
    short.pop();
    let mut long = upload_messages("bad", &parts, false);
    long.push(chunk(ImagePart::Rootfs, b"x"));
    let mut unannounced = upload_messages("bad", &parts, false);
    unannounced.push(chunk(ImagePart::Initrd, b"x"));
    let mut no_header = upload_messages("bad", &parts, false);
    no_header.remove(0);
    let huge = vec![header(UploadImageHeader {
        image_id: "bad".into(),
        kernel_size: 1,
        rootfs_size: 16 << 20,
        ..Default::default()
    })];
    let odd_size = vec![header(UploadImageHeader {
        image_id: "bad".into(),
        kernel_size: 1,
        rootfs_size: 1000,
        ..Default::default()
    })];
    for (messages, want) in [
        (wrong, "header.rootfs_sha256"),
        (short, "header.rootfs_size"),
        (long, "chunk.data"),
        (unannounced, "chunk.part"),
        (no_header, "header"),
        (huge, "header.rootfs_size"),
        (odd_size, "header.rootfs_size"),
        (upload_messages("Bad", &parts, false), "header.image_id"),
    ] {
        let (code, field) = code_and_field(upload(&mut images, messages).await);
        assert_eq!((code, field.as_str()), (Code::InvalidArgument, want));
    }
    let (code, _) = code_and_field(upload(&mut images, upload_messages("up", &parts, false)).await);
    assert_eq!(code, Code::AlreadyExists);
    let names: Vec<String> = std::fs::read_dir(dir.path().join("images"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    let mut names = names;
    names.sort();
    assert_eq!(names, ["base", "up"], "refused uploads leave nothing");

    // Get, list with a selector and pages, NOT_FOUND.
    let (code, _) = code_and_field(
        images
            .get_image(GetImageRequest {
                image_id: "nope".into(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);
    let (code, field) = code_and_field(images.get_image(GetImageRequest { image_id: "-".into() }).await);
    assert_eq!((code, field.as_str()), (Code::InvalidArgument, "image_id"));
    let page = images
        .list_images(ListImagesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(page.images.len(), 1);
    assert_eq!(page.images[0].image_id, "base");
    let rest = images
        .list_images(ListImagesRequest {
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(rest.images.len(), 1);
    assert!(rest.next_page_token.is_empty());
    let labelled = images
        .list_images(ListImagesRequest {
            label_selector: "os=probe".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(labelled.images.len(), 1, "only the registered one has labels");

    // CreateVm on images: refusals, then a VM (which fails to boot: its kernel is junk) with a
    // root overlay of one image and a data overlay of the other.
    let on = |image: &str| VmSpec {
        image_id: image.into(),
        ..Default::default()
    };
    for (spec, want_code, want_field) in [
        (on("nope"), Code::NotFound, "no image with id 'nope'"),
        (on("Bad"), Code::InvalidArgument, "spec.image_id"),
        (
            VmSpec {
                kernel: kernel.display().to_string(),
                ..on("base")
            },
            Code::InvalidArgument,
            "spec.kernel",
        ),
        (
            VmSpec {
                disks: vec![Disk {
                    path: kernel.display().to_string(),
                    root: true,
                    ..Default::default()
                }],
                ..on("base")
            },
            Code::InvalidArgument,
            "spec.disks[0].root",
        ),
        (
            VmSpec {
                disks: vec![Disk {
                    path: kernel.display().to_string(),
                    image_id: "up".into(),
                    ..Default::default()
                }],
                ..on("base")
            },
            Code::InvalidArgument,
            "spec.disks[0].path",
        ),
    ] {
        let (code, field) = code_and_field(vms.create_vm(image_vm_request("img-bad", spec)).await);
        assert_eq!((code, field.as_str()), (want_code, want_field));
    }
    assert!(
        !dir.path().join("vms/img-bad").exists(),
        "a refused create leaves no files"
    );
    let spec = VmSpec {
        disks: vec![Disk {
            image_id: "up".into(),
            ..Default::default()
        }],
        ..on("base")
    };
    vms.create_vm(image_vm_request("img-vm", spec)).await?;
    let vm = wait_state(&mut vms, "img-vm", VmState::Failed, Duration::from_secs(30)).await?;
    let spec = vm.spec.unwrap_or_default();
    assert_eq!(
        spec.kernel,
        dir.path().join("images/base/kernel").display().to_string()
    );
    assert_eq!(
        spec.initrd,
        dir.path().join("images/base/initrd").display().to_string()
    );
    let root_overlay = dir.path().join("vms/img-vm/disk0.overlay");
    let data_overlay = dir.path().join("vms/img-vm/disk1.overlay");
    assert_eq!(spec.disks.len(), 2);
    assert!(spec.disks[0].root);
    assert_eq!(spec.disks[0].path, root_overlay.display().to_string());
    assert_eq!(
        (spec.disks[1].image_id.as_str(), spec.disks[1].root),
        ("up", false)
    );
    for overlay in [&root_overlay, &data_overlay] {
        let meta = std::fs::metadata(overlay)?;
        assert_eq!(
            (meta.len(), meta.blocks()),
            (4 << 20, 0),
            "{}: empty and sparse",
            overlay.display()
        );
    }
    let vm_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("vms/img-vm/vm.json"))?)?;
    assert_eq!(
        vm_json["drives"][0]["backing"],
        dir.path().join("images/base/rootfs").display().to_string()
    );
    assert_eq!(
        vm_json["drives"][1]["backing"],
        dir.path().join("images/up/rootfs").display().to_string()
    );
    let base = images
        .get_image(GetImageRequest {
            image_id: "base".into(),
        })
        .await?
        .into_inner();
    assert_eq!((base.vms_using, base.snapshots_using), (1, 0));
    let delete = |id: &str, request_id: &str| DeleteImageRequest {
        image_id: id.into(),
        request_id: request_id.into(),
    };
    for id in ["base", "up"] {
        let status = images.delete_image(delete(id, "")).await.expect_err("in use");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("VM 'img-vm'"), "{status:?}");
    }

    // An agent restart keeps the images and clears what a crash would leave.
    agent.kill9();
    std::fs::create_dir_all(dir.path().join("images/.staging-half-1-0"))?;
    std::fs::create_dir_all(dir.path().join("images/orphan"))?;
    let agent = Agent::start(dir.path(), &["--image-max-bytes", "8388608"])?;
    agent.wait_serving().await?;
    let mut images = ImageServiceClient::new(agent.channel().await?);
    let mut vms = agent.vms().await?;
    assert!(!dir.path().join("images/orphan").exists());
    assert!(!dir.path().join("images/.staging-half-1-0").exists());
    let listed = images
        .list_images(ListImagesRequest::default())
        .await?
        .into_inner();
    let ids: Vec<&str> = listed.images.iter().map(|i| i.image_id.as_str()).collect();
    assert_eq!(ids, ["base", "up"]);

    // vmmctl lists them and uploads through the same stream.
    let vmmctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmmctl"))
            .arg("--endpoint")
            .arg(format!("unix:{}", agent.socket.display()))
            .args(args)
            .output()
    };
    let out = vmmctl(&["--json", "image", "get", "base"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["rootfs"]["sha256"], rootfs_file.sha256);
    assert_eq!(shown["vms_using"], 1);
    std::fs::write(&rootfs, &rootfs_data)?;
    let (k, r) = (kernel.display().to_string(), rootfs.display().to_string());
    let out = vmmctl(&["--json", "image", "upload", "ctl", "--kernel", &k, "--rootfs", &r])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["rootfs"]["sha256"], rootfs_file.sha256);
    let out = vmmctl(&["image", "list"])?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID") && table.contains("ctl"), "{table}");
    let out = vmmctl(&["image", "delete", "base"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"));
    let out = vmmctl(&[
        "--json",
        "create",
        "ctl-vm",
        "--image",
        "ctl",
        "--memory-mib",
        "64",
    ])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(created["spec"]["image_id"], "ctl");
    assert_eq!(created["spec"]["disks"][0]["image_id"], "ctl");
    assert_eq!(created["spec"]["disks"][0]["root"], true);
    let out = vmmctl(&["delete", "ctl-vm"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The VM gone, with its overlays, the images can go; a retried delete answers OK.
    vms.delete_vm(DeleteVmRequest {
        vm_id: "img-vm".into(),
        request_id: String::new(),
    })
    .await?;
    assert!(!root_overlay.exists() && !data_overlay.exists());
    images.delete_image(delete("base", "del-1")).await?;
    images.delete_image(delete("base", "del-1")).await?;
    let (code, _) = code_and_field(images.delete_image(delete("base", "")).await);
    assert_eq!(code, Code::NotFound);
    assert!(!dir.path().join("images/base").exists());
    let out = vmmctl(&["image", "delete", "up"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = images
        .list_images(ListImagesRequest::default())
        .await?
        .into_inner();
    assert_eq!(listed.images.len(), 1);
    Ok(())
}

fn crc_hex(data: &[u8]) -> String {
    format!("{:08x}", crc32(data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_on_an_image_keeps_its_writes_in_its_overlay() -> Result<()> {
    harness::require_kvm();
    let guest = GuestImages::get()?;
    let dir = state_dir("img-guest")?;
    let rootfs = dir.path().join("rootfs.img");
    let base = write_rootfs(&rootfs)?;
    let mut agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut images = ImageServiceClient::new(agent.channel().await?);
    let registered = images
        .register_image(register(
            "probe",
            &guest.vmlinux,
            &rootfs,
            Some(&guest.initramfs),
            "",
        ))
        .await?
        .into_inner();
    // The same files streamed give the same image.
    let kernel_data = std::fs::read(&guest.vmlinux)?;
    let initrd_data = std::fs::read(&guest.initramfs)?;
    let parts: [(ImagePart, &[u8]); 3] = [
        (ImagePart::Kernel, &kernel_data),
        (ImagePart::Rootfs, &base),
        (ImagePart::Initrd, &initrd_data),
    ];
    let uploaded = upload(&mut images, upload_messages("probe-up", &parts, true)).await?;
    for (a, b) in [
        (&registered.kernel, &uploaded.kernel),
        (&registered.rootfs, &uploaded.rootfs),
        (&registered.initrd, &uploaded.initrd),
    ] {
        assert_eq!(a.as_ref().map(|f| &f.sha256), b.as_ref().map(|f| &f.sha256));
    }
    let base_sha = registered
        .rootfs
        .as_ref()
        .map(|f| f.sha256.clone())
        .unwrap_or_default();
    assert_eq!(base_sha, sha256(&base));

    // Each boot reads 64 KiB, writes its first 4 KiB and reads 32 KiB back.
    let mut spec =
        probe_spec("blk-read:vda:0:65536,blk-write:vda:0:4096:9,blk-flush:vda,blk-read:vda:0:32768,idle")?;
    spec.kernel.clear();
    spec.initrd.clear();
    spec.image_id = "probe".into();
    let mut vms = agent.vms().await?;
    vms.create_vm(CreateVmRequest {
        vm_id: "on-image".into(),
        spec: Some(spec),
        request_id: String::new(),
    })
    .await?;
    let first = wait_console(&mut vms, "on-image", "vmmprobe: idle", BOOT_TIMEOUT).await?;
    let overlay_path = dir.path().join("vms/on-image/disk0.overlay");
    let base_path = dir.path().join("images/probe/rootfs");
    let read = probe_fields(&first, "blk-read dev=vda offset=0 len=65536")?;
    assert_eq!(read["result"], "0");
    assert_eq!(
        read["crc32"],
        crc_hex(&base[..65536]),
        "the guest reads the base through the overlay"
    );
    let written = probe_fields(&first, "blk-write dev=vda")?;
    assert_eq!(written["result"], "0", "{first}");
    assert_eq!(probe_fields(&first, "blk-flush dev=vda")?["result"], "0");
    let overlay = std::fs::read(&overlay_path)?;
    assert_eq!(overlay.len(), base.len(), "the overlay is as large as the base");
    assert_eq!(
        crc_hex(&overlay[..4096]),
        written["crc32"],
        "the write landed in the overlay"
    );
    let mut expected = overlay[..4096].to_vec();
    expected.extend_from_slice(&base[4096..65536]);
    assert_eq!(
        probe_fields(&first, "blk-read dev=vda offset=0 len=32768")?["crc32"],
        crc_hex(&expected[..32768]),
        "written blocks from the overlay, the rest from the base"
    );
    assert!(
        std::fs::metadata(&overlay_path)?.blocks() * 512 < 1 << 20,
        "the overlay holds only what was written"
    );
    assert_eq!(
        sha256(&std::fs::read(&base_path)?),
        base_sha,
        "the base is unchanged"
    );
    let status = images
        .delete_image(DeleteImageRequest {
            image_id: "probe".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("in use");
    assert_eq!(status.code(), Code::FailedPrecondition);

    // Stopped, the agent killed and started again, the VM started: its writes are still there.
    let stopped = vms
        .stop_vm(StopVmRequest {
            vm_id: "on-image".into(),
            request_id: String::new(),
            timeout_ms: 20_000,
            force: false,
        })
        .await?
        .into_inner();
    assert_eq!(stopped.state(), VmState::Stopped);
    agent.kill9();
    let agent = Agent::start(dir.path(), &[])?;
    agent.wait_serving().await?;
    let mut vms = agent.vms().await?;
    let mut images = ImageServiceClient::new(agent.channel().await?);
    vms.start_vm(StartVmRequest {
        vm_id: "on-image".into(),
        request_id: String::new(),
    })
    .await?;
    let second = wait_console(&mut vms, "on-image", "vmmprobe: idle", BOOT_TIMEOUT).await?;
    let read = probe_fields(&second, "blk-read dev=vda offset=0 len=65536")?;
    assert_eq!(read["result"], "0");
    assert_eq!(
        read["crc32"],
        crc_hex(&expected),
        "the second boot reads what the first wrote"
    );
    assert_eq!(
        sha256(&std::fs::read(&base_path)?),
        base_sha,
        "the base is still unchanged"
    );

    // A snapshot copies the overlay and holds the image: with the VM deleted (and its overlay
    // with it), the image stays in use, and a VM restored from the snapshot runs on it.
    let channel = agent.channel().await?;
    let mut snaps = SnapshotServiceClient::new(channel.clone());
    let snapshot = snapshot_of(
        &mut snaps,
        &channel,
        CreateSnapshotRequest {
            vm_id: "on-image".into(),
            snapshot_id: "snap".into(),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(snapshot.spec.as_ref().map(|s| s.image_id.as_str()), Some("probe"));
    vms.delete_vm(DeleteVmRequest {
        vm_id: "on-image".into(),
        request_id: String::new(),
    })
    .await?;
    assert!(!overlay_path.exists(), "deleting the VM removes its overlay");
    let gone = vms
        .get_vm(GetVmRequest {
            vm_id: "on-image".into(),
        })
        .await;
    assert_eq!(gone.map(|_| ()).unwrap_err().code(), Code::NotFound);
    let status = images
        .delete_image(DeleteImageRequest {
            image_id: "probe".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("held by the snapshot");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("snapshot 'snap'"), "{status:?}");
    let back = restored(
        &mut snaps,
        &channel,
        RestoreSnapshotRequest {
            snapshot_id: "snap".into(),
            vm_id: "restored".into(),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(back.state(), VmState::Running);
    let disk = back.spec.unwrap_or_default().disks.remove(0);
    let copy = dir.path().join("vms/restored/disk0.img");
    assert_eq!(
        (disk.image_id.as_str(), disk.path.as_str()),
        ("probe", &*copy.display().to_string())
    );
    let copied = std::fs::read(&copy)?;
    assert_eq!(copied.len(), base.len());
    assert_eq!(
        crc_hex(&copied[..4096]),
        written["crc32"],
        "the restored VM has the overlay's data"
    );
    let held = images
        .get_image(GetImageRequest {
            image_id: "probe".into(),
        })
        .await?
        .into_inner();
    assert_eq!((held.vms_using, held.snapshots_using), (1, 1));
    vms.delete_vm(DeleteVmRequest {
        vm_id: "restored".into(),
        request_id: String::new(),
    })
    .await?;
    snaps
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: "snap".into(),
            request_id: String::new(),
        })
        .await?;

    // Nothing holds the images any more: they can go.
    for id in ["probe", "probe-up"] {
        images
            .delete_image(DeleteImageRequest {
                image_id: id.into(),
                request_id: String::new(),
            })
            .await?;
    }
    assert!(!base_path.exists());
    Ok(())
}
