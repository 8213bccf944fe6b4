#!/usr/bin/env bash
# The main job: set everything up, then boot a Linux guest with `vmm` and watch it come up.
# The guest kernel's built-in probe prints BOOT-COMPLETE and what it sees (CPUs, memory, initrd), then
# powers the VM off. Extra arguments go to the probe's action list (default: poweroff), e.g.
#   scripts/boot-demo.sh counter,poweroff
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
actions=${1:-poweroff}
exec target/release/vmm --kernel "$VMLINUX" --initrd "$INITRAMFS" --vcpus 2 --memory-mib 256 \
    --cmdline "console=ttyS0 quiet pci=off vmmprobe.action=$actions"
