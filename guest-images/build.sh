#!/usr/bin/env bash
# Build the VMM test guest artifacts (kernel, ext4 rootfs, initramfs) from
# Debian packages into a cache outside the repository, keyed by a hash of the
# recipe, and print one KEY=/absolute/path line per artifact on stdout.
#
#   guest-images/build.sh            # build if needed, print VMLINUX=... etc.
#   VMM_IMAGES_CACHE=/dir build.sh   # use another cache root
#
# stdout carries only the KEY=path lines; progress goes to stderr and the
# build log to $cache_root/build-<hash>.log (copied to <hash>/build.log).
# See guest-images/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${VMM_IMAGES_CACHE:-$HOME/.cache/vmm-guest-images}

linux_pkg=linux-source-6.12
linux_tarball=/usr/src/$linux_pkg.tar.xz
# Packages whose version changes the artifacts: part of the cache key.
hashed_pkgs=("$linux_pkg" busybox-static e2fsprogs gcc)
# Everything the build needs (installed automatically when run as root).
deps=("${hashed_pkgs[@]}" make libc6-dev bc flex bison libelf-dev xz-utils patch)

rootfs_size=32M
build_tmp=
build_log=
# Fixed identifiers and timestamps keep the images reproducible.
rootfs_uuid=5eed0000-0000-4000-8000-000000000001
fixed_mtime=1700000000
# Bytes of pseudo-random payload in the initramfs (for the crc32 check).
random_kib=384

# Progress goes to fd 3 (the caller's stderr) even while output is logged.
exec 3>&2
log() { echo "guest-images: $*" >&3; }
die() { log "error: $*"; exit 1; }

ensure_deps() {
	local missing=() pkg status
	for pkg in "${deps[@]}"; do
		status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
		[[ $status == ii* ]] || missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	[[ $(id -u) -eq 0 ]] || die "missing packages (install as root): ${missing[*]}"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
		apt-get update -qq >/dev/null 2>&1
		apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
			die "apt-get install ${missing[*]} failed"
	fi
}

# Hash of every recipe file (README.md excluded) plus the versions of the
# Debian packages that end up in or build the artifacts.
recipe_hash() {
	{
		(cd "$here" && find build.sh kernel probe rootfs -type f -print0 |
			LC_ALL=C sort -z | xargs -0 sha256sum)
		dpkg-query -W -f='${Package} ${Version}\n' "${hashed_pkgs[@]}"
	} | sha256sum | cut -c1-16
}

print_artifacts() {
	local dir=$1
	echo "VMLINUX=$dir/vmlinux"
	echo "BZIMAGE=$dir/bzImage"
	echo "ROOTFS=$dir/rootfs.ext4"
	echo "INITRAMFS=$dir/initramfs.cpio"
}

artifacts_present() {
	local f
	for f in vmlinux bzImage rootfs.ext4 initramfs.cpio; do
		[[ -s $1/$f ]] || return 1
	done
}

# Copy the probe into the tree as drivers/misc/vmmprobe/ and hook it up.
add_probe() {
	local src=$1
	mkdir -p "$src/drivers/misc/vmmprobe"
	cp "$here"/probe/{Kconfig,Makefile,vmmprobe.h,vmmprobe.c,vmmprobe_net.c,vmmprobe_mem.c} "$src/drivers/misc/vmmprobe/"
	# shellcheck disable=SC2016 # a literal make variable
	echo 'obj-$(CONFIG_VMMPROBE) += vmmprobe/' >>"$src/drivers/misc/Makefile"
	# Insert the source line before the final "endmenu" of drivers/misc/Kconfig.
	sed -i '$ s|^endmenu$|source "drivers/misc/vmmprobe/Kconfig"\nendmenu|' \
		"$src/drivers/misc/Kconfig"
	grep -q vmmprobe "$src/drivers/misc/Kconfig" || die "could not hook vmmprobe into drivers/misc/Kconfig"
}

configure_kernel() {
	local src=$1 frag=$here/kernel/config-fragment line missing=()
	make -C "$src" ARCH=x86_64 tinyconfig
	(cd "$src" && scripts/kconfig/merge_config.sh -n .config "$frag")
	make -C "$src" ARCH=x86_64 olddefconfig
	# Kconfig silently drops options whose dependencies are unmet: check.
	while IFS= read -r line; do
		grep -qxF "$line" "$src/.config" || missing+=("$line")
	done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=y$' "$frag")
	if ((${#missing[@]})); then
		log "kernel config: options from kernel/config-fragment missing in .config" \
			"(unmet dependencies?):"
		printf '  %s\n' "${missing[@]}" >&3
		die "kernel configuration check failed"
	fi
}

build_kernel() {
	local src=$1 out=$2 patch
	for patch in "$here"/kernel/patches/*.patch; do
		patch -d "$src" -p1 --forward --batch <"$patch"
	done
	add_probe "$src"
	configure_kernel "$src"
	make -C "$src" ARCH=x86_64 -j"$(nproc)" bzImage vmlinux
	cp "$src/vmlinux" "$out/vmlinux"
	cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
	cp "$src/.config" "$out/kernel.config"
	cp "$src/System.map" "$out/System.map"
}

# Lay out busybox + init in $1 (applet symlinks as `busybox --install -s`).
stage_userland() {
	local root=$1 bb=/bin/busybox applet
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,mnt,run,var}
	chmod 1777 "$root/tmp"
	cp "$bb" "$root/bin/busybox"
	while IFS= read -r applet; do
		case $applet in bin/busybox | linuxrc | "") continue ;; esac
		ln -sf /bin/busybox "$root/$applet"
	done < <("$bb" --list-full)
	install -m 0755 "$here/rootfs/init" "$root/sbin/init"
}

build_rootfs() {
	local tmp=$1 out=$2 root=$1/rootfs-tree
	stage_userland "$root"
	find "$root" -exec touch -h -d "@$fixed_mtime" {} +
	E2FSPROGS_FAKE_TIME=$fixed_mtime mkfs.ext4 -q -F -L rootfs -U "$rootfs_uuid" \
		-E "root_owner=0:0,hash_seed=$rootfs_uuid" -d "$root" "$out/rootfs.ext4" "$rootfs_size"
}

build_initramfs() {
	local tmp=$1 out=$2 src=$3 root=$1/initramfs-tree list=$1/initramfs.list path rel
	stage_userland "$root"
	install -m 0755 "$here/rootfs/init" "$root/init"
	# Deterministic high-entropy payload: a slice of the (versioned) kernel
	# source tarball, skipping the xz header.
	mkdir -p "$root/data"
	dd if="$linux_tarball" of="$root/data/random.bin" bs=1024 skip=4 count="$random_kib" status=none
	find "$root" -exec touch -h -d "@$fixed_mtime" {} +
	# gen_init_cpio (from the kernel tree) needs no root for /dev/console.
	gcc -O2 -o "$tmp/gen_init_cpio" "$src/usr/gen_init_cpio.c"
	{
		while IFS= read -r path; do
			rel=${path#"$root"}
			[[ -n $rel ]] || continue
			if [[ -L $path ]]; then
				echo "slink $rel $(readlink "$path") 0777 0 0"
			elif [[ -d $path ]]; then
				echo "dir $rel $(stat -c %a "$path") 0 0"
			else
				echo "file $rel $path $(stat -c %a "$path") 0 0"
			fi
		done < <(find "$root" | LC_ALL=C sort)
		# After "dir /dev": the kernel's unpacker does not create parents.
		echo "nod /dev/console 0600 0 0 c 5 1"
	} >"$list"
	"$tmp/gen_init_cpio" -t "$fixed_mtime" "$list" >"$out/initramfs.cpio"
}

build() {
	local hash=$1 final=$2 start
	build_log=$cache_root/build-$hash.log
	# We hold the lock: any temp dir left for this hash is from a killed build.
	rm -rf "$cache_root/.tmp-$hash".*
	build_tmp=$(mktemp -d "$cache_root/.tmp-$hash.XXXXXX")
	trap on_exit EXIT
	trap 'exit 130' INT TERM
	start=$SECONDS
	log "building into $final (log: $build_log)"
	: >"$build_log"
	# A plain subshell (not in a conditional) so that `set -e` stays active.
	(
		local src=$build_tmp/$linux_pkg
		log "extracting $linux_tarball"
		tar -C "$build_tmp" -xf "$linux_tarball"
		log "building kernel (make -j$(nproc))"
		build_kernel "$src" "$build_tmp"
		log "building rootfs and initramfs"
		build_rootfs "$build_tmp" "$build_tmp"
		build_initramfs "$build_tmp" "$build_tmp" "$src"
		rm -rf "$src" "$build_tmp"/{rootfs-tree,initramfs-tree,gen_init_cpio,initramfs.list}
	) >>"$build_log" 2>&1
	artifacts_present "$build_tmp" || die "artifacts missing after build"
	cp "$build_log" "$build_tmp/build.log"
	chmod 755 "$build_tmp"
	# Atomic publish: the cache entry appears complete or not at all.
	mv -T "$build_tmp" "$final"
	build_tmp=
	log "done in $((SECONDS - start)) s"
}

on_exit() {
	local rc=$?
	[[ -z ${build_tmp:-} ]] || rm -rf "$build_tmp"
	if ((rc != 0)) && [[ -n ${build_log:-} ]]; then
		tail -n 15 "$build_log" >&3
		log "build failed (exit $rc), full log: $build_log"
	fi
}

main() {
	ensure_deps
	local hash final
	hash=$(recipe_hash)
	final=$cache_root/$hash
	if ! artifacts_present "$final"; then
		mkdir -p "$cache_root"
		exec 9>"$cache_root/.lock-$hash"
		flock 9
		artifacts_present "$final" || build "$hash" "$final"
		exec 9>&-
	fi
	print_artifacts "$final"
}

main "$@"
