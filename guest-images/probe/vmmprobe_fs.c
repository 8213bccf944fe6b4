// SPDX-License-Identifier: GPL-2.0
/*
 * vmmprobe file system actions: what a guest user space would do to a data
 * disk (mount it, write a file, unmount it when the machine shuts down),
 * done by the kernel because user space cannot run on the hosts this project
 * is tested on. Host-side tests then check the image with e2fsck.
 *
 * fs-write leaves its data in the page cache (no fsync): a snapshot taken
 * afterwards holds part of the file system's state in guest memory, which a
 * restored guest must write out when it unmounts at shutdown.
 */

#include <linux/blkdev.h>
#include <linux/crc32.h>
#include <linux/err.h>
#include <linux/fcntl.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/init_syscalls.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/stat.h>
#include <linux/syscalls.h>

#include "vmmprobe.h"

/* Data disks mounted at once, each at /vmmprobe-fs-DEV. */
#define FS_MOUNTS_MAX		4
#define FS_BUF_BYTES		(64 * 1024)

struct fs_mount {
	char dev[32];
	char dir[48];
};

static struct fs_mount fs_mounts[FS_MOUNTS_MAX];
static int fs_mount_count;
static DEFINE_MUTEX(fs_lock);

/* "vdb" or "/dev/vdb" -> "vdb". */
static const char *fs_dev_name(const char *dev)
{
	return strncmp(dev, "/dev/", 5) ? dev : dev + 5;
}

/* Mounts @dev read-write (once) and returns its directory, or an ERR_PTR. */
static const char *__init fs_mount(const char *dev)
{
	char node[48], path[40];
	struct fs_mount *m;
	dev_t devt;
	int i, ret;

	for (i = 0; i < fs_mount_count; i++)
		if (!strcmp(fs_mounts[i].dev, dev))
			return fs_mounts[i].dir;
	if (fs_mount_count == FS_MOUNTS_MAX || strlen(dev) >= sizeof(fs_mounts[0].dev))
		return ERR_PTR(-ENOSPC);
	snprintf(path, sizeof(path), "/dev/%s", dev);
	ret = early_lookup_bdev(path, &devt);
	if (ret)
		return ERR_PTR(ret);
	m = &fs_mounts[fs_mount_count];
	snprintf(node, sizeof(node), "/vmmprobe-fs-%s.dev", dev);
	snprintf(m->dir, sizeof(m->dir), "/vmmprobe-fs-%s", dev);
	ret = init_mknod(node, S_IFBLK | 0600, new_encode_dev(devt));
	if (ret && ret != -EEXIST)
		return ERR_PTR(ret);
	ret = init_mkdir(m->dir, 0700);
	if (ret && ret != -EEXIST)
		return ERR_PTR(ret);
	ret = init_mount(node, m->dir, "ext4", 0, NULL);
	if (ret)
		return ERR_PTR(ret);
	strscpy(m->dev, dev, sizeof(m->dev));
	fs_mount_count++;
	return m->dir;
}

static int fs_write_file(const char *dir, const char *name, u64 len, u32 seed, u32 *crc)
{
	u64 state = pattern_init(seed), done = 0;
	struct file *file;
	loff_t pos = 0;
	u32 c = CRC_INIT;
	char *full;
	u8 *buf;
	int ret = 0;

	full = kasprintf(GFP_KERNEL, "%s/%s", dir, name);
	if (!full)
		return -ENOMEM;
	file = filp_open(full, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	kfree(full);
	if (IS_ERR(file))
		return PTR_ERR(file);
	buf = kmalloc(FS_BUF_BYTES, GFP_KERNEL);
	if (!buf) {
		ret = -ENOMEM;
		goto out;
	}
	while (done < len) {
		size_t n = min_t(u64, FS_BUF_BYTES, len - done);
		ssize_t w;

		pattern_fill(buf, n, &state);
		w = kernel_write(file, buf, n, &pos);
		if (w < 0) {
			ret = w;
			break;
		}
		if (w != n) {
			ret = -EIO;
			break;
		}
		c = crc32_le(c, buf, n);
		done += n;
	}
out:
	kfree(buf);
	__fput_sync(file);
	*crc = crc_final(c);
	return ret;
}

/* fs-write:DEV:NAME:LEN:SEED */
void __init act_fs_write(int argc, char **argv)
{
	const char *dev = fs_dev_name(argv[1]), *name = argv[2], *dir;
	u64 len = 0;
	u32 seed = 0, crc = 0;
	char hex[9];
	int ret;

	if (parse_bytes(argv[3], &len) || len % 8 || kstrtou32(argv[4], 0, &seed) ||
	    strchr(name, '/')) {
		probe_print("vmmprobe: bad action arguments: fs-write:%s:%s:%s:%s",
			    argv[1], argv[2], argv[3], argv[4]);
		return;
	}
	mutex_lock(&fs_lock);
	dir = fs_mount(dev);
	ret = IS_ERR(dir) ? PTR_ERR(dir) : fs_write_file(dir, name, len, seed, &crc);
	mutex_unlock(&fs_lock);
	probe_print("vmmprobe: fs-write dev=%s name=%s len=%llu crc32=%s result=%d",
		    dev, name, len, crc_str(hex, crc, ret), ret);
}

/*
 * Called by the reboot notifier: writes out and unmounts what fs-write
 * mounted, as a user space's shutdown would. init_umount() is __init, which
 * is safe here: the probe never lets the boot finish, so init memory is never
 * freed (__ref tells modpost so).
 */
void __ref probe_fs_unmount_all(void)
{
	int i;

	mutex_lock(&fs_lock);
	if (fs_mount_count)
		ksys_sync();
	for (i = 0; i < fs_mount_count; i++) {
		int ret = init_umount(fs_mounts[i].dir, 0);

		probe_print("vmmprobe: fs-umount dev=%s result=%d", fs_mounts[i].dev, ret);
	}
	fs_mount_count = 0;
	mutex_unlock(&fs_lock);
}
