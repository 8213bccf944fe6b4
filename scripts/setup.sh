#!/usr/bin/env bash
# Installs what the project needs on a Debian host (apt packages when run as root and missing), builds
# the guest images (cached outside the repo) and the release `vmm`, `vmm-agent` and `vmmctl`.
# Idempotent; fast when warm.
# Prints the guest image paths (KEY=/path lines) on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(linux-source-6.12 busybox-static e2fsprogs cpio xz-utils bc flex bison libelf-dev make gcc iproute2 iputils-ping
          libc6-dev qemu-system-x86)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing packages (install them as root): ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "setup: warning: /dev/kvm is missing or not accessible; guests cannot boot" >&2
fi

guest-images/build.sh
cargo build --release -p vmm -p vmm-agent --quiet >&2
