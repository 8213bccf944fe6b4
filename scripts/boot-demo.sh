#!/usr/bin/env bash
# The main job: set everything up, then boot a Linux guest through the host agent and watch it come up.
# It starts `vmm-agent` on a Unix socket in a temporary state directory, creates a VM with `vmmctl`
# (the agent runs its `vmm`), follows the serial console until the guest's built-in probe has printed
# BOOT-COMPLETE and what it sees (CPUs, memory, initrd, the virtio-blk root drive and a file read from
# its ext4 file system), then stops and deletes the VM and stops the agent. Extra arguments replace the
# probe's action list (an `idle` is appended so the guest waits to be stopped), e.g.
#   scripts/boot-demo.sh counter
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
actions="${1:-blk-info,blk-root:/sbin/init},idle"

state=$(mktemp -d /tmp/vmm-demo.XXXXXX)
agent_pid=
cleanup() {
    if [[ -n $agent_pid ]]; then
        kill "$agent_pid" 2>/dev/null || true
        wait "$agent_pid" 2>/dev/null || true
    fi
    rm -rf "$state"
}
trap cleanup EXIT

target/release/vmm-agent --state-dir "$state" --listen "unix:$state/agent.sock" 2>"$state/agent.log" &
agent_pid=$!
ctl() { target/release/vmmctl --endpoint "unix:$state/agent.sock" "$@"; }
for _ in $(seq 200); do
    ctl host >/dev/null 2>&1 && break
    kill -0 "$agent_pid" 2>/dev/null || { cat "$state/agent.log" >&2; exit 1; }
    sleep 0.05
done

echo "== vmmctl create demo" >&2
ctl create demo --kernel "$VMLINUX" --initrd "$INITRAMFS" --vcpus 2 --memory-mib 256 \
    --disk "path=$ROOTFS,ro,root" --cmdline "console=ttyS0 quiet pci=off vmmprobe.action=$actions"
echo "== vmmctl console demo (until the probe is done)" >&2
ctl console demo --until "vmmprobe: idle" --timeout-s 300
ctl console demo --tail 1000000 | grep -q BOOT-COMPLETE
echo "== vmmctl get demo" >&2
ctl get demo
echo "== vmmctl stop demo" >&2
ctl stop demo --timeout-ms 20000
echo "== vmmctl delete demo" >&2
ctl delete demo
