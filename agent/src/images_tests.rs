use std::io::{Seek, SeekFrom, Write};

use super::*;

fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&SHA256, data).as_ref())
}

fn temp_dir(tag: &str) -> harness::TempDir {
    harness::TempDir::new(&format!("agent-images-{tag}")).unwrap()
}

#[test]
fn a_sparse_copy_keeps_the_bytes_and_the_holes() {
    let dir = temp_dir("copy");
    let src_path = dir.path().join("src");
    let mut src = File::create(&src_path).unwrap();
    // Data, a hole of 8 MiB, data, explicit zeros, a trailing hole.
    src.write_all(&[7u8; 5000]).unwrap();
    src.seek(SeekFrom::Start(8 << 20)).unwrap();
    src.write_all(b"middle").unwrap();
    src.write_all(&vec![0u8; 2 << 20]).unwrap();
    src.set_len(16 << 20).unwrap();
    let len = src.metadata().unwrap().len();
    let want = std::fs::read(&src_path).unwrap();
    let src = File::open(&src_path).unwrap();
    let dst_path = dir.path().join("dst");
    let dst = File::create(&dst_path).unwrap();
    let digest = copy_sparse(&src, &dst, len).unwrap();
    assert_eq!(digest, sha256_hex(&want));
    assert_eq!(std::fs::read(&dst_path).unwrap(), want);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&dst_path).unwrap().blocks() * 512;
    assert!(
        allocated <= 16 << 10,
        "the copy is sparse: {allocated} bytes allocated"
    );
}

#[test]
fn a_streamed_part_is_hashed_and_bounded() {
    let dir = temp_dir("part");
    let path = dir.path().join("rootfs");
    let mut w = PartWriter::create(&path, 4096).unwrap();
    w.append(&[0u8; 1024]).unwrap();
    w.append(&[3u8; 1024]).unwrap();
    assert_eq!(w.remaining(), 2048);
    assert!(!w.complete());
    w.append(&[0u8; 2048]).unwrap();
    assert!(w.complete());
    let mut want = vec![0u8; 4096];
    want[1024..2048].fill(3);
    assert_eq!(w.finish(), sha256_hex(&want));
    assert_eq!(std::fs::read(&path).unwrap(), want);
}

#[test]
fn staging_is_placed_whole_or_removed() {
    let dir = temp_dir("staging");
    let images = dir.path().join("images");
    let dropped = Staging::create(&images, "a").unwrap();
    std::fs::write(dropped.path(ImagePart::Kernel), b"k").unwrap();
    drop(dropped);
    assert_eq!(
        std::fs::read_dir(&images).unwrap().count(),
        0,
        "a dropped staging dir goes"
    );
    // A leftover of the same id (no record) is replaced.
    std::fs::create_dir_all(images.join("a")).unwrap();
    std::fs::write(images.join("a/junk"), b"x").unwrap();
    let staging = Staging::create(&images, "a").unwrap();
    std::fs::write(staging.path(ImagePart::Kernel), b"k").unwrap();
    let placed = staging.place().unwrap();
    assert_eq!(placed, images.join("a"));
    assert!(!placed.join("junk").exists());
    let mode = std::fs::metadata(placed.join("kernel"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444);
    // At start: staging dirs and unrecorded images go, recorded ones stay.
    let left = Staging::create(&images, "b").unwrap();
    std::mem::forget(left);
    std::fs::create_dir_all(images.join("c")).unwrap();
    remove_leftovers(&images, &["a".to_string()]);
    let names: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a"]);
}

#[test]
fn part_sizes() {
    let max = 1 << 20;
    check_part_size("rootfs", ImagePart::Rootfs, 4096, 0, max).unwrap();
    check_part_size("initrd", ImagePart::Initrd, 0, 0, max).unwrap();
    for (part, size, so_far) in [
        (ImagePart::Kernel, 0, 0),
        (ImagePart::Rootfs, 0, 0),
        (ImagePart::Rootfs, 1000, 0),
        (ImagePart::Rootfs, 4096, max - 512),
    ] {
        let e = check_part_size("f", part, size, so_far, max).unwrap_err();
        assert!(matches!(e, AgentError::InvalidArgument { .. }), "{e}");
        assert!(e.to_string().starts_with("f: "), "{e}");
    }
    check_sha256("s", "").unwrap();
    check_sha256("s", &"aB".repeat(32)).unwrap();
    assert!(check_sha256("s", "abc").is_err());
    assert!(check_sha256("s", &"zz".repeat(32)).is_err());
}

fn image(id: &str, rootfs_size: u64, initrd: bool) -> Image {
    let dir = Path::new("/state/images").join(id);
    let mut parts = vec![
        (ImagePart::Kernel, 10, "k".to_string()),
        (ImagePart::Rootfs, rootfs_size, "r".to_string()),
    ];
    if initrd {
        parts.push((ImagePart::Initrd, 5, "i".to_string()));
    }
    image_record(id, &dir, &parts, HashMap::new(), 1)
}

#[test]
fn a_spec_on_an_image_gets_its_kernel_and_a_root_overlay() {
    let images = HashMap::from([
        ("base".to_string(), image("base", 4 << 20, true)),
        ("data".to_string(), image("data", 1 << 20, false)),
    ]);
    let mut spec = VmSpec {
        vcpus: 1,
        memory_mib: 128,
        image_id: "base".into(),
        disks: vec![
            Disk {
                path: "/srv/shared.img".into(),
                read_only: true,
                ..Default::default()
            },
            Disk {
                image_id: "data".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    check_spec_images(&spec).unwrap();
    assert_eq!(spec_image_ids(&spec), ["base", "data"]);
    let vm_dir = Path::new("/state/vms/a");
    let overlays = resolve_spec(&mut spec, &images, vm_dir).unwrap();
    assert_eq!(spec.kernel, "/state/images/base/kernel");
    assert_eq!(spec.initrd, "/state/images/base/initrd");
    assert_eq!(spec.disks.len(), 3);
    let root = &spec.disks[0];
    assert!(root.root && !root.read_only);
    assert_eq!(
        (root.path.as_str(), root.image_id.as_str()),
        ("/state/vms/a/disk0.overlay", "base")
    );
    assert_eq!(spec.disks[1].path, "/srv/shared.img");
    assert_eq!(spec.disks[2].path, "/state/vms/a/disk2.overlay");
    assert_eq!(
        overlays,
        [
            Overlay {
                path: vm_dir.join("disk0.overlay"),
                size: 4 << 20
            },
            Overlay {
                path: vm_dir.join("disk2.overlay"),
                size: 1 << 20
            },
        ]
    );
    // The vmm gets the overlay with the image's rootfs as its base.
    let config = crate::spec::to_vm_config(&spec, Path::new("/c.log"), Path::new("/state/images"));
    assert_eq!(
        config.drives[0].backing.as_deref(),
        Some(Path::new("/state/images/base/rootfs"))
    );
    assert_eq!(config.drives[1].backing, None);
    assert_eq!(
        config.drives[2].backing.as_deref(),
        Some(Path::new("/state/images/data/rootfs"))
    );
    assert!(config.drives[0].root);
    config.validate().unwrap();
    // Without the image at hand: NOT_FOUND.
    let mut spec = VmSpec {
        image_id: "gone".into(),
        ..Default::default()
    };
    let e = resolve_spec(&mut spec, &images, vm_dir).unwrap_err();
    assert!(matches!(e, AgentError::ImageNotFound(_)), "{e}");
}

#[test]
fn image_fields_are_checked_and_named() {
    let on = |f: &dyn Fn(&mut VmSpec)| {
        let mut s = VmSpec {
            image_id: "base".into(),
            ..Default::default()
        };
        f(&mut s);
        check_spec_images(&s).unwrap_err().to_string()
    };
    assert!(on(&|s| s.image_id = "Bad_Id".into()).starts_with("spec.image_id:"));
    assert!(on(&|s| s.kernel = "/k".into()).starts_with("spec.kernel:"));
    assert!(on(&|s| s.initrd = "/i".into()).starts_with("spec.initrd:"));
    let root = Disk {
        path: "/r".into(),
        root: true,
        ..Default::default()
    };
    assert!(on(&|s| s.disks = vec![root.clone()]).starts_with("spec.disks[0].root:"));
    let with_path = Disk {
        path: "/x".into(),
        image_id: "base".into(),
        ..Default::default()
    };
    let e = on(&|s| {
        s.image_id.clear();
        s.disks = vec![Disk::default(), with_path.clone()];
    });
    assert!(e.starts_with("spec.disks[1].path:"), "{e}");
    let e = on(&|s| {
        s.disks = vec![Disk {
            image_id: "-x".into(),
            ..Default::default()
        }]
    });
    assert!(e.starts_with("spec.disks[0].image_id:"), "{e}");
    // Without images, nothing to say.
    check_spec_images(&VmSpec::default()).unwrap();
}

#[test]
fn overlays_are_sparse_and_sized() {
    let dir = temp_dir("overlay");
    let path = dir.path().join("vms/a/disk0.overlay");
    create_overlays(&[Overlay {
        path: path.clone(),
        size: 4 << 20,
    }])
    .unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.len(), meta.blocks()), (4 << 20, 0));
}
