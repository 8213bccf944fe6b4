#!/usr/bin/env bash
# The main job: set everything up, then boot a Linux guest with `vmm` and watch it come up.
# The guest kernel's built-in probe prints BOOT-COMPLETE and what it sees (CPUs, memory, initrd, the
# virtio-blk root drive and a file read from its ext4 file system), then powers the VM off. Extra
# arguments replace the probe's action list, e.g.
#   scripts/boot-demo.sh counter,poweroff
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
actions=${1:-blk-info,blk-root:/sbin/init,poweroff}
exec target/release/vmm --kernel "$VMLINUX" --initrd "$INITRAMFS" --vcpus 2 --memory-mib 256 \
    --drive "path=$ROOTFS,id=root,root=on,ro=on" \
    --cmdline "console=ttyS0 quiet pci=off vmmprobe.action=$actions"
