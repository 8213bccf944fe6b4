// SPDX-License-Identifier: GPL-2.0
/*
 * vmmprobe: in-kernel test driver for the VMM project.
 *
 * On the hosts this project is tested on, guest user space cannot run, so
 * the end-to-end tests drive the guest through this built-in code instead.
 * It is inert unless "vmmprobe.action=" is on the kernel command line.
 * The console lines printed here are a stable interface parsed by tests;
 * see guest-images/README.md before changing any of them.
 */

#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/cpumask.h>
#include <linux/crc32.h>
#include <linux/delay.h>
#include <linux/device.h>
#include <linux/err.h>
#include <linux/fcntl.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/init.h>
#include <linux/init_syscalls.h>
#include <linux/initrd.h>
#include <linux/input.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/llist.h>
#include <linux/math64.h>
#include <linux/memblock.h>
#include <linux/mm.h>
#include <linux/moduleparam.h>
#include <uapi/linux/mount.h>
#include <linux/panic.h>
#include <linux/printk.h>
#include <linux/reboot.h>
#include <linux/slab.h>
#include <linux/stat.h>
#include <linux/string.h>
#include <linux/sysctl.h>
#include <linux/unaligned.h>
#include <linux/wait.h>

#include "vmmprobe.h"

/* Parameters are "vmmprobe.<name>=" whatever the object file is called. */
#undef MODULE_PARAM_PREFIX
#define MODULE_PARAM_PREFIX "vmmprobe."

/* Same port and value as Firecracker's boot timer device. */
#define BOOT_TIMER_PORT		0x3f0
#define BOOT_TIMER_VALUE	123

/* Comma-separated list of actions; NULL means the probe stays inert. */
static char *action;
module_param(action, charp, 0);

static unsigned int count = 10;
module_param(count, uint, 0);

/*
 * Guest kernel code is emulated instruction by instruction on kvm_pvm
 * hosts, where a CRC-32 of a 2.4 MB initrd costs tens of seconds, so the
 * checksum is computed only when asked for.
 */
static bool initrd_crc;
module_param(initrd_crc, bool, 0);

/*
 * What Ctrl-Alt-Del from the keyboard does: "reboot" hands it to the
 * kernel's ctrl_alt_del() (a restart, as with the VT keyboard driver and no
 * init that took it over); "ignore" only reports it, like a guest that has
 * hung or disabled the key combination.
 */
static char *cad = "reboot";
module_param(cad, charp, 0);

/* Captured before populate_rootfs() frees the initrd memory. */
static bool initrd_seen;
static unsigned long initrd_size;
static u32 initrd_crc_value;

/* Longest action item (name plus ':'-separated arguments) and most fields. */
#define ACTION_ITEM_MAX		256
#define ACTION_ARGS_MAX		8

static void __noreturn probe_idle_forever(void)
{
	for (;;)
		msleep_interruptible(60 * MSEC_PER_SEC);
}

static void act_poweroff(int argc, char **argv)
{
	kernel_power_off();
}

static void act_reboot(int argc, char **argv)
{
	kernel_restart(NULL);
}

static void act_panic(int argc, char **argv)
{
	panic("vmmprobe: requested panic");
}

static void act_counter(int argc, char **argv)
{
	unsigned int i;

	for (i = 1; i <= count; i++) {
		if (i > 1)
			msleep(100);
		probe_print("vmmprobe: counter=%u", i);
	}
}

static void act_idle(int argc, char **argv)
{
	probe_print("vmmprobe: idle");
	probe_idle_forever();
}

/* ---- Keyboard and shutdown path ------------------------------------------ */

/*
 * The guest has no VT (serial console only), so nothing in the kernel turns
 * Ctrl-Alt-Del into ctrl_alt_del(): this input handler does, for every
 * keyboard (the VMM's i8042 with the AT keyboard driver).
 */
static void probe_kbd_event(struct input_handle *handle, unsigned int type,
			    unsigned int code, int value)
{
	unsigned long *keys = handle->dev->key;
	bool ctrl, alt;

	if (type != EV_KEY || code != KEY_DELETE || value != 1)
		return;
	ctrl = test_bit(KEY_LEFTCTRL, keys) || test_bit(KEY_RIGHTCTRL, keys);
	alt = test_bit(KEY_LEFTALT, keys) || test_bit(KEY_RIGHTALT, keys);
	if (!ctrl || !alt)
		return;
	if (!strcmp(cad, "ignore")) {
		probe_print("vmmprobe: ctrl-alt-del ignored");
		return;
	}
	probe_print("vmmprobe: ctrl-alt-del");
	/* Safe in interrupt context: it only schedules the restart work. */
	ctrl_alt_del();
}

static int probe_kbd_connect(struct input_handler *handler, struct input_dev *dev,
			     const struct input_device_id *id)
{
	struct input_handle *handle;
	int err;

	handle = kzalloc(sizeof(*handle), GFP_KERNEL);
	if (!handle)
		return -ENOMEM;
	handle->dev = dev;
	handle->handler = handler;
	handle->name = "vmmprobe";
	err = input_register_handle(handle);
	if (err)
		goto free;
	err = input_open_device(handle);
	if (err)
		goto unregister;
	probe_print("vmmprobe: keyboard name=%s", dev->name ? dev->name : "-");
	return 0;
unregister:
	input_unregister_handle(handle);
free:
	kfree(handle);
	return err;
}

static void probe_kbd_disconnect(struct input_handle *handle)
{
	input_close_device(handle);
	input_unregister_handle(handle);
	kfree(handle);
}

static const struct input_device_id probe_kbd_ids[] = {
	{ .flags = INPUT_DEVICE_ID_MATCH_EVBIT, .evbit = { BIT_MASK(EV_KEY) } },
	{ },
};

static struct input_handler probe_kbd_handler = {
	.event = probe_kbd_event,
	.connect = probe_kbd_connect,
	.disconnect = probe_kbd_disconnect,
	.name = "vmmprobe",
	.id_table = probe_kbd_ids,
};

/* Shows the test that the guest ran its shutdown path, not just stopped. */
static int probe_reboot_notify(struct notifier_block *nb, unsigned long event, void *unused)
{
	const char *what = event == SYS_RESTART ? "restart" :
			   event == SYS_POWER_OFF ? "power-off" : "halt";

	probe_print("vmmprobe: reboot-notifier event=%s", what);
	probe_fs_unmount_all();
	return NOTIFY_DONE;
}

static struct notifier_block probe_reboot_nb = {
	.notifier_call = probe_reboot_notify,
};

static void __init watch_shutdown_path(void)
{
	int err;

	err = register_reboot_notifier(&probe_reboot_nb);
	if (err)
		probe_print("vmmprobe: reboot notifier error=%d", err);
	err = input_register_handler(&probe_kbd_handler);
	if (err)
		probe_print("vmmprobe: keyboard handler error=%d", err);
}

/* ---- Block devices ------------------------------------------------------ */

/*
 * Synchronous I/O goes through one physically contiguous buffer of at most
 * this size (order 5), in as many bios as needed.
 */
#define BLK_CHUNK_BYTES		(128 * 1024)
/* blk-load block sizes: 512 bytes to 1 MiB (one contiguous buffer). */
#define BLK_LOAD_BS_MAX		(1024 * 1024)
#define BLK_LOAD_QD_MAX		256
/* blk-load gives up when no I/O completes for this long. */
#define BLK_LOAD_STALL_SECS	60
/* blk-root waits this long for the root device to appear. */
#define BLK_ROOT_WAIT_SECS	300
/* Where blk-root mounts the root device (in the initial rootfs). */
#define BLK_ROOT_NODE		"/vmmprobe-root.dev"
#define BLK_ROOT_DIR		"/vmmprobe-root"

/* "vdb" or "/dev/vdb" -> "vdb". */
static const char *probe_disk_name(const char *name)
{
	return strncmp(name, "/dev/", 5) ? name : name + 5;
}

/* The block device called @name ("vdb"), or 0. */
static dev_t probe_disk_devt(const char *name)
{
	struct device *dev;
	dev_t devt;

	dev = class_find_device_by_name(&block_class, name);
	if (!dev)
		return 0;
	devt = dev->devt;
	put_device(dev);
	return devt;
}

/*
 * Opens block device @name without a holder. Unlike bdev_file_open_by_path(),
 * opening by number does not refuse BLK_OPEN_WRITE on a read-only disk, so
 * writes to a read-only disk really reach the device (the 6.12 block layer
 * only warns about them): the VMM has to reject them itself.
 */
struct file *probe_disk_open(const char *name, bool write)
{
	dev_t devt = probe_disk_devt(name);

	if (!devt)
		return ERR_PTR(-ENODEV);
	return bdev_file_open_by_dev(devt, BLK_OPEN_READ | (write ? BLK_OPEN_WRITE : 0),
				     NULL, NULL);
}

/*
 * fput() from the init task would only queue the release as task work, which
 * runs on the return to user space that never comes.
 */
void probe_disk_close(struct file *file)
{
	__fput_sync(file);
}

/* Checks an I/O range: block aligned, inside the disk, not empty. */
static int probe_check_range(struct block_device *bdev, u64 off, u64 len)
{
	unsigned int lbs = bdev_logical_block_size(bdev);

	if (!len || off % lbs || len % lbs)
		return -EINVAL;
	if (off > bdev_nr_bytes(bdev) || len > bdev_nr_bytes(bdev) - off)
		return -EINVAL;
	return 0;
}

/*
 * Reads or writes [@off, @off + @len) of @bdev with bios, BLK_CHUNK_BYTES at a
 * time, waiting for each. Writes write the pattern continuing from *@state.
 * *@crc gets the CRC-32 of the data read or written (complete on success).
 */
static int probe_disk_rw(struct block_device *bdev, bool write, u64 off, u64 len,
		   u64 *state, u32 *crc)
{
	unsigned int order = get_order(min_t(u64, len, BLK_CHUNK_BYTES));
	struct page *page;
	u32 c = CRC_INIT;
	int ret = 0;
	u8 *buf;

	page = alloc_pages(GFP_KERNEL, order);
	if (!page)
		return -ENOMEM;
	buf = page_address(page);
	while (len) {
		unsigned int n = min_t(u64, len, BLK_CHUNK_BYTES);
		struct bio *bio;

		if (write)
			pattern_fill(buf, n, state);
		bio = bio_alloc(bdev, 1, write ? REQ_OP_WRITE : REQ_OP_READ, GFP_KERNEL);
		bio->bi_iter.bi_sector = off >> SECTOR_SHIFT;
		__bio_add_page(bio, page, n, 0);
		ret = submit_bio_wait(bio);
		bio_put(bio);
		if (ret)
			break;
		c = crc32_le(c, buf, n);
		off += n;
		len -= n;
	}
	__free_pages(page, order);
	*crc = crc_final(c);
	return ret;
}

/* Parses a byte count or offset: decimal or 0x hex, optional K/M/G suffix. */
/*
 * The disk's "serial" sysfs attribute (the virtio-blk driver's GET_ID
 * request), called directly: sysfs is not mounted this early. Empty when the
 * disk has no serial (or the request fails).
 */
static void probe_disk_serial(struct gendisk *disk, char *buf)
{
	struct device *dev = disk_to_dev(disk);
	const struct attribute_group **groups = dev->groups;
	ssize_t n = 0;
	char *p;

	buf[0] = '\0';
	for (; groups && *groups; groups++) {
		struct attribute **attrs = (*groups)->attrs;

		for (; attrs && *attrs; attrs++) {
			struct device_attribute *da;

			if (strcmp((*attrs)->name, "serial"))
				continue;
			da = container_of(*attrs, struct device_attribute, attr);
			if (da->show)
				n = da->show(dev, da, buf);
			goto found;
		}
	}
found:
	if (n < 0 || n >= PAGE_SIZE)
		n = 0;
	buf[n] = '\0';
	strim(buf);
	/* One token on the line: no spaces or control characters. */
	for (p = buf; *p; p++)
		if (*p <= ' ' || *p > '~')
			*p = '?';
}

static void act_blk_info(int argc, char **argv)
{
	unsigned int found = 0;
	char name[8];
	char *serial;
	int i;

	serial = (char *)__get_free_page(GFP_KERNEL);
	for (i = 0; i < 26; i++) {
		struct block_device *bdev;
		struct device *dev;

		snprintf(name, sizeof(name), "vd%c", 'a' + i);
		dev = class_find_device_by_name(&block_class, name);
		if (!dev)
			continue;
		bdev = dev_to_bdev(dev);
		if (serial)
			probe_disk_serial(bdev->bd_disk, serial);
		probe_print("vmmprobe: blk dev=%s size-bytes=%llu ro=%d lbs=%u flush=%d discard=%d write-zeroes=%d queues=%u serial=%s",
			    name, (unsigned long long)bdev_nr_bytes(bdev),
			    bdev_read_only(bdev) ? 1 : 0,
			    bdev_logical_block_size(bdev),
			    bdev_write_cache(bdev) ? 1 : 0,
			    bdev_max_discard_sectors(bdev) ? 1 : 0,
			    bdev_write_zeroes_sectors(bdev) ? 1 : 0,
			    bdev_get_queue(bdev)->nr_hw_queues,
			    serial && serial[0] ? serial : "-");
		put_device(dev);
		found++;
	}
	free_page((unsigned long)serial);
	probe_print("vmmprobe: blk count=%u", found);
}

/* blk-write:DEV:OFFSET:LEN:SEED */
static void act_blk_write(int argc, char **argv)
{
	const char *name = probe_disk_name(argv[1]);
	u64 off, len, state;
	struct file *file;
	u32 seed, crc = 0;
	char hex[9];
	int ret;

	if (parse_bytes(argv[2], &off) || parse_bytes(argv[3], &len) ||
	    kstrtou32(argv[4], 0, &seed)) {
		probe_print("vmmprobe: bad action arguments: %s:%s:%s:%s", argv[1],
			    argv[2], argv[3], argv[4]);
		return;
	}
	state = pattern_init(seed);
	file = probe_disk_open(name, true);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
	} else {
		struct block_device *bdev = file_bdev(file);

		ret = probe_check_range(bdev, off, len);
		if (!ret)
			ret = probe_disk_rw(bdev, true, off, len, &state, &crc);
		if (!ret)
			ret = blkdev_issue_flush(bdev);
		probe_disk_close(file);
	}
	probe_print("vmmprobe: blk-write dev=%s offset=%llu len=%llu seed=%u crc32=%s result=%d",
		    name, off, len, seed, crc_str(hex, crc, ret), ret);
}

/* blk-read:DEV:OFFSET:LEN */
static void act_blk_read(int argc, char **argv)
{
	const char *name = probe_disk_name(argv[1]);
	struct file *file;
	u64 off, len;
	u32 crc = 0;
	char hex[9];
	int ret;

	if (parse_bytes(argv[2], &off) || parse_bytes(argv[3], &len)) {
		probe_print("vmmprobe: bad action arguments: %s:%s:%s", argv[1],
			    argv[2], argv[3]);
		return;
	}
	file = probe_disk_open(name, false);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
	} else {
		ret = probe_check_range(file_bdev(file), off, len);
		if (!ret)
			ret = probe_disk_rw(file_bdev(file), false, off, len, NULL, &crc);
		probe_disk_close(file);
	}
	probe_print("vmmprobe: blk-read dev=%s offset=%llu len=%llu crc32=%s result=%d",
		    name, off, len, crc_str(hex, crc, ret), ret);
}

/* blk-flush:DEV */
static void act_blk_flush(int argc, char **argv)
{
	const char *name = probe_disk_name(argv[1]);
	struct file *file;
	int ret;

	file = probe_disk_open(name, true);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
	} else {
		ret = blkdev_issue_flush(file_bdev(file));
		probe_disk_close(file);
	}
	probe_print("vmmprobe: blk-flush dev=%s result=%d", name, ret);
}

/*
 * DISCARD or WRITE ZEROES bios for [@off, @off + @len), submitted directly
 * (the block layer splits them at the device's limits): blkdev_issue_discard()
 * turns every -EOPNOTSUPP into success and does nothing at all without
 * discard support, and blkdev_issue_zeroout() refuses read-only disks itself
 * (-EPERM) before anything reaches the device. -EOPNOTSUPP when the driver
 * did not enable the operation (no fallback to writing zero pages); a
 * VIRTIO_BLK_S_UNSUPP answer gives -EOPNOTSUPP too.
 */
static int probe_discard_or_zero(struct block_device *bdev, bool zero, u64 off,
				 u64 len, bool unmap)
{
	u64 max = round_down(UINT_MAX, bdev_logical_block_size(bdev));
	blk_opf_t opf = zero ? REQ_OP_WRITE_ZEROES | (unmap ? 0 : REQ_NOUNMAP)
			     : REQ_OP_DISCARD;
	int ret = 0;

	if (!(zero ? bdev_write_zeroes_sectors(bdev) : bdev_max_discard_sectors(bdev)))
		return -EOPNOTSUPP;
	while (len && !ret) {
		u64 n = min(len, max);
		struct bio *bio;

		bio = bio_alloc(bdev, 0, opf, GFP_KERNEL);
		bio->bi_iter.bi_sector = off >> SECTOR_SHIFT;
		bio->bi_iter.bi_size = n;
		ret = submit_bio_wait(bio);
		bio_put(bio);
		off += n;
		len -= n;
	}
	return ret;
}

/* blk-discard:DEV:OFFSET:LEN and blk-zero:DEV:OFFSET:LEN[:nounmap] */
static void blk_discard_or_zero(int argc, char **argv, bool zero)
{
	const char *name = probe_disk_name(argv[1]);
	bool unmap = true;
	struct file *file;
	u64 off, len;
	int ret;

	if (parse_bytes(argv[2], &off) || parse_bytes(argv[3], &len) ||
	    (argc > 4 && (!zero || strcmp(argv[4], "nounmap")))) {
		probe_print("vmmprobe: bad action arguments: %s:%s:%s%s%s", argv[1],
			    argv[2], argv[3], argc > 4 ? ":" : "", argc > 4 ? argv[4] : "");
		return;
	}
	if (argc > 4)
		unmap = false;
	file = probe_disk_open(name, true);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
	} else {
		struct block_device *bdev = file_bdev(file);

		ret = probe_check_range(bdev, off, len);
		if (!ret)
			ret = probe_discard_or_zero(bdev, zero, off, len, unmap);
		probe_disk_close(file);
	}
	if (zero)
		probe_print("vmmprobe: blk-zero dev=%s offset=%llu len=%llu unmap=%d result=%d",
			    name, off, len, unmap ? 1 : 0, ret);
	else
		probe_print("vmmprobe: blk-discard dev=%s offset=%llu len=%llu result=%d",
			    name, off, len, ret);
}

static void act_blk_discard(int argc, char **argv)
{
	blk_discard_or_zero(argc, argv, false);
}

static void act_blk_zero(int argc, char **argv)
{
	blk_discard_or_zero(argc, argv, true);
}

/* ---- blk-load: asynchronous load generator ------------------------------ */

enum load_mode { LOAD_RANDREAD, LOAD_RANDWRITE, LOAD_SEQREAD, LOAD_SEQWRITE };

static const char *const load_mode_names[] = {
	[LOAD_RANDREAD] = "randread",
	[LOAD_RANDWRITE] = "randwrite",
	[LOAD_SEQREAD] = "seqread",
	[LOAD_SEQWRITE] = "seqwrite",
};

struct load_ctx;

/* One in-flight I/O: an embedded bio, reused for every resubmission. */
struct load_slot {
	struct bio bio;
	struct bio_vec bvec;
	struct load_ctx *ctx;
	struct llist_node node;
	blk_status_t status;
};

struct load_ctx {
	struct block_device *bdev;
	struct page *page;	/* shared data buffer of bs bytes */
	unsigned int order;
	unsigned int bs;
	blk_opf_t opf;
	bool random;
	u64 nblocks;		/* the span in units of bs */
	u64 next_block;		/* sequential modes */
	u64 rng;		/* random modes: xorshift64 state */
	struct llist_head done;	/* completed slots, filled by load_end_io */
	wait_queue_head_t wait;
	struct load_slot slots[];
};

/* Completion (interrupt context): hand the slot back to the submitter. */
static void load_end_io(struct bio *bio)
{
	struct load_slot *slot = container_of(bio, struct load_slot, bio);
	struct load_ctx *ctx = slot->ctx;

	slot->status = bio->bi_status;
	llist_add(&slot->node, &ctx->done);
	wake_up(&ctx->wait);
}

static void load_submit(struct load_ctx *ctx, struct load_slot *slot)
{
	u64 block;

	if (ctx->random) {
		ctx->rng ^= ctx->rng << 13;
		ctx->rng ^= ctx->rng >> 7;
		ctx->rng ^= ctx->rng << 17;
		div64_u64_rem(ctx->rng, ctx->nblocks, &block);
	} else {
		block = ctx->next_block++;
		if (ctx->next_block >= ctx->nblocks)
			ctx->next_block = 0;
	}
	bio_reset(&slot->bio, ctx->bdev, ctx->opf);
	slot->bio.bi_iter.bi_sector = block * (ctx->bs >> SECTOR_SHIFT);
	/* Every slot uses the same buffer: the data does not matter here. */
	__bio_add_page(&slot->bio, ctx->page, ctx->bs, 0);
	slot->bio.bi_end_io = load_end_io;
	submit_bio(&slot->bio);
}

struct load_result {
	u64 ios, bytes, errors;
	s64 elapsed_ns;
};

/*
 * Keeps @qd I/Os in flight for @seconds, then waits for the last ones.
 * Returns 0, or -ETIMEDOUT if I/O stopped completing (the context is then
 * leaked on purpose: its bios are still owned by the device).
 */
static int load_run(struct load_ctx *ctx, unsigned int qd, unsigned int seconds,
		    struct load_result *res)
{
	unsigned int inflight = 0, i;
	struct blk_plug plug;
	ktime_t start, deadline;

	start = ktime_get();
	deadline = ktime_add_ms(start, (u64)seconds * MSEC_PER_SEC);
	blk_start_plug(&plug);
	for (i = 0; i < qd; i++) {
		load_submit(ctx, &ctx->slots[i]);
		inflight++;
	}
	blk_finish_plug(&plug);

	while (inflight) {
		struct load_slot *slot, *next;
		struct llist_node *list;
		bool again;

		if (!wait_event_timeout(ctx->wait, !llist_empty(&ctx->done),
					BLK_LOAD_STALL_SECS * HZ) &&
		    llist_empty(&ctx->done)) {
			res->elapsed_ns = ktime_to_ns(ktime_sub(ktime_get(), start));
			return -ETIMEDOUT;
		}
		list = llist_del_all(&ctx->done);
		again = ktime_before(ktime_get(), deadline);
		blk_start_plug(&plug);
		llist_for_each_entry_safe(slot, next, list, node) {
			inflight--;
			if (slot->status) {
				res->errors++;
			} else {
				res->ios++;
				res->bytes += ctx->bs;
			}
			if (again) {
				load_submit(ctx, slot);
				inflight++;
			}
		}
		blk_finish_plug(&plug);
	}
	res->elapsed_ns = ktime_to_ns(ktime_sub(ktime_get(), start));
	return 0;
}

/* blk-load:DEV:MODE:BS:QD:SECONDS[:SPAN] */
static void act_blk_load(int argc, char **argv)
{
	const char *name = probe_disk_name(argv[1]);
	struct load_result res = { 0 };
	struct load_ctx *ctx = NULL;
	struct file *file = NULL;
	unsigned int qd, seconds, i;
	u64 bs, span = 0, iops = 0, mibps100 = 0;
	int mode, ret;

	mode = match_string(load_mode_names, ARRAY_SIZE(load_mode_names), argv[2]);
	if (mode < 0 || parse_bytes(argv[3], &bs) || kstrtouint(argv[4], 0, &qd) ||
	    kstrtouint(argv[5], 0, &seconds) ||
	    (argc > 6 && parse_bytes(argv[6], &span))) {
		probe_print("vmmprobe: bad action arguments: %s:%s:%s:%s:%s%s%s", argv[1],
			    argv[2], argv[3], argv[4], argv[5], argc > 6 ? ":" : "",
			    argc > 6 ? argv[6] : "");
		return;
	}

	ret = -EINVAL;
	if (bs < SECTOR_SIZE || bs > BLK_LOAD_BS_MAX || bs % SECTOR_SIZE ||
	    !qd || qd > BLK_LOAD_QD_MAX)
		goto out;
	file = probe_disk_open(name, mode == LOAD_RANDWRITE || mode == LOAD_SEQWRITE);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		file = NULL;
		goto out;
	}
	if (!span || span > bdev_nr_bytes(file_bdev(file)))
		span = bdev_nr_bytes(file_bdev(file));
	ret = -EINVAL;
	if (bs % bdev_logical_block_size(file_bdev(file)) || span < bs)
		goto out;

	ret = -ENOMEM;
	ctx = kzalloc(struct_size(ctx, slots, qd), GFP_KERNEL);
	if (!ctx)
		goto out;
	ctx->bdev = file_bdev(file);
	ctx->bs = bs;
	ctx->order = get_order(bs);
	ctx->page = alloc_pages(GFP_KERNEL, ctx->order);
	if (!ctx->page)
		goto out;
	ctx->random = mode == LOAD_RANDREAD || mode == LOAD_RANDWRITE;
	ctx->opf = (mode == LOAD_RANDWRITE || mode == LOAD_SEQWRITE) ?
		   REQ_OP_WRITE : REQ_OP_READ;
	ctx->nblocks = div64_u64(span, bs);
	init_llist_head(&ctx->done);
	init_waitqueue_head(&ctx->wait);
	/*
	 * Writes write pattern data, never zeroes; the random offsets continue
	 * the same xorshift64 stream (seed 0), so every run is the same.
	 */
	ctx->rng = pattern_init(0);
	pattern_fill(page_address(ctx->page), bs, &ctx->rng);
	for (i = 0; i < qd; i++) {
		ctx->slots[i].ctx = ctx;
		bio_init(&ctx->slots[i].bio, ctx->bdev, &ctx->slots[i].bvec, 1, ctx->opf);
	}

	probe_print("vmmprobe: blk-load-start dev=%s mode=%s bs=%llu qd=%u seconds=%u span-bytes=%llu",
		    name, argv[2], bs, qd, seconds, span);
	ret = load_run(ctx, qd, seconds, &res);
	if (ret) {
		/* Bios still in flight point into ctx and its buffer: leak them. */
		ctx = NULL;
		file = NULL;
	}
	if (res.elapsed_ns > 0) {
		u64 bps = mul_u64_u64_div_u64(res.bytes, NSEC_PER_SEC, res.elapsed_ns);

		iops = mul_u64_u64_div_u64(res.ios, NSEC_PER_SEC, res.elapsed_ns);
		mibps100 = (bps * 100) >> 20;
	}
out:
	if (ctx) {
		for (i = 0; i < qd; i++)
			bio_uninit(&ctx->slots[i].bio);
		if (ctx->page)
			__free_pages(ctx->page, ctx->order);
		kfree(ctx);
	}
	if (file)
		probe_disk_close(file);
	probe_print("vmmprobe: blk-load dev=%s mode=%s bs=%llu qd=%u seconds=%u ios=%llu bytes=%llu iops=%llu mibps=%llu.%02llu errors=%llu elapsed-us=%lld result=%d",
		    name, argv[2], bs, qd, seconds, res.ios, res.bytes, iops,
		    mibps100 / 100, mibps100 % 100, res.errors,
		    div_s64(res.elapsed_ns, NSEC_PER_USEC), ret);
}

/* ---- blk-root: mount the root= device and read a file from it ---------- */

/*
 * The value of the last "KEY" parameter (e.g. "root=") on the kernel command
 * line, before any "--", copied into @out; false if absent.
 */
static bool __init cmdline_value(const char *key, char *out, size_t size)
{
	const char *p = saved_command_line, *found = NULL;
	size_t klen = strlen(key);

	while (*p) {
		size_t len;

		p = skip_spaces(p);
		len = strcspn(p, " \t\n");
		if (len == 2 && !strncmp(p, "--", 2))
			break;
		if (len > klen && !strncmp(p, key, klen))
			found = p;
		p += len;
	}
	if (!found)
		return false;
	found += klen;
	strscpy(out, found, min(size, strcspn(found, " \t\n") + 1));
	return true;
}

static int __init blk_root_mount(const char *root, const char *fstype,
				 const char **stage)
{
	static bool mounted;
	unsigned int waited_ms = 0;
	dev_t devt;
	int ret;

	if (mounted)
		return 0;
	/* Like the kernel's "rootwait": all probing done, then poll. */
	*stage = "lookup";
	wait_for_device_probe();
	while ((ret = early_lookup_bdev(root, &devt))) {
		if (waited_ms >= BLK_ROOT_WAIT_SECS * MSEC_PER_SEC)
			return ret;
		msleep(100);
		waited_ms += 100;
	}
	/* The initial rootfs is unpacked asynchronously. */
	*stage = "mount";
	wait_for_initramfs();
	ret = init_mknod(BLK_ROOT_NODE, S_IFBLK | 0600, new_encode_dev(devt));
	if (ret && ret != -EEXIST)
		return ret;
	ret = init_mkdir(BLK_ROOT_DIR, 0700);
	if (ret && ret != -EEXIST)
		return ret;
	/* root_mountflags: MS_RDONLY unless "rw" is on the command line. */
	ret = init_mount(BLK_ROOT_NODE, BLK_ROOT_DIR, fstype, root_mountflags, NULL);
	if (!ret)
		mounted = true;
	return ret;
}

static int blk_root_read(const char *path, u64 *size, u32 *crc)
{
	char *full, *buf = NULL;
	struct file *file;
	loff_t pos = 0;
	u32 c = CRC_INIT;
	int ret = 0;

	full = kasprintf(GFP_KERNEL, BLK_ROOT_DIR "%s%s", path[0] == '/' ? "" : "/", path);
	if (!full)
		return -ENOMEM;
	file = filp_open(full, O_RDONLY, 0);
	kfree(full);
	if (IS_ERR(file))
		return PTR_ERR(file);
	if (!S_ISREG(file_inode(file)->i_mode)) {
		ret = -EINVAL;
		goto out;
	}
	buf = kmalloc(PAGE_SIZE, GFP_KERNEL);
	if (!buf) {
		ret = -ENOMEM;
		goto out;
	}
	for (;;) {
		ssize_t n = kernel_read(file, buf, PAGE_SIZE, &pos);

		if (n < 0) {
			ret = n;
			break;
		}
		if (!n)
			break;
		c = crc32_le(c, buf, n);
	}
out:
	kfree(buf);
	__fput_sync(file);
	*size = pos;
	*crc = crc_final(c);
	return ret;
}

/* blk-root:PATH */
static void __init act_blk_root(int argc, char **argv)
{
	char root[64] = "-", fstype[32] = "ext4";
	const char *stage = "cmdline";
	const char *path = argv[1];
	u64 size = 0;
	u32 crc = 0;
	char hex[9];
	int ret = -ENOENT;

	if (cmdline_value("root=", root, sizeof(root))) {
		/* Only the first of a rootfstype= list is tried. */
		if (cmdline_value("rootfstype=", fstype, sizeof(fstype)))
			fstype[strcspn(fstype, ",")] = '\0';
		ret = blk_root_mount(root, fstype, &stage);
		if (!ret) {
			stage = "read";
			ret = blk_root_read(path, &size, &crc);
		}
	}
	if (ret)
		probe_print("vmmprobe: blk-root root=%s fstype=%s ro=%d path=%s size=%llu crc32=- result=%d at=%s",
			    root, fstype, root_mountflags & MS_RDONLY ? 1 : 0, path, size, ret, stage);
	else
		probe_print("vmmprobe: blk-root root=%s fstype=%s ro=%d path=%s size=%llu crc32=%s result=0",
			    root, fstype, root_mountflags & MS_RDONLY ? 1 : 0, path, size,
			    crc_str(hex, crc, 0));
}

/* ---- Action table --------------------------------------------------------- */

struct probe_action {
	const char *name;
	void (*run)(int argc, char **argv);
	/* Arguments after the name: at least min_args, at most max_args. */
	int min_args, max_args;
	const char *usage;
};

static const struct probe_action probe_actions[] __initconst = {
	{ "poweroff",	act_poweroff, 0, 0, "poweroff" },
	{ "reboot",	act_reboot, 0, 0, "reboot" },
	{ "panic",	act_panic, 0, 0, "panic" },
	{ "counter",	act_counter, 0, 0, "counter" },
	{ "idle",	act_idle, 0, 0, "idle" },
	{ "blk-info",	act_blk_info, 0, 0, "blk-info" },
	{ "blk-write",	act_blk_write, 4, 4, "blk-write:DEV:OFFSET:LEN:SEED" },
	{ "blk-read",	act_blk_read, 3, 3, "blk-read:DEV:OFFSET:LEN" },
	{ "blk-flush",	act_blk_flush, 1, 1, "blk-flush:DEV" },
	{ "blk-discard", act_blk_discard, 3, 3, "blk-discard:DEV:OFFSET:LEN" },
	{ "blk-zero",	act_blk_zero, 3, 4, "blk-zero:DEV:OFFSET:LEN[:nounmap]" },
	{ "blk-load",	act_blk_load, 5, 6, "blk-load:DEV:MODE:BS:QD:SECONDS[:SPAN]" },
	{ "blk-root",	act_blk_root, 1, 1, "blk-root:PATH" },
	{ "blk-dirty",	act_blk_dirty, 2, 2, "blk-dirty:DEV:SPAN" },
	{ "fs-write",	act_fs_write, 4, 4, "fs-write:DEV:NAME:LEN:SEED" },
	{ "net-info",	act_net_info, 0, 0, "net-info" },
	{ "net-addr",	act_net_addr, 3, 3, "net-addr:DEV:IP:PREFIXLEN" },
	{ "net-echo",	act_net_echo, 1, 1, "net-echo:PORT" },
	{ "net-udp-echo", act_net_udp_echo, 1, 1, "net-udp-echo:PORT" },
	{ "net-send",	act_net_send, 3, 4, "net-send:IP:PORT:BYTES[:STREAMS]" },
	{ "net-recv",	act_net_recv, 2, 3, "net-recv:IP:PORT[:STREAMS]" },
	{ "mem-alloc",	act_mem_alloc, 1, 2, "mem-alloc:SIZE[:oom]" },
	{ "mem-free",	act_mem_free, 0, 1, "mem-free[:odd]" },
	{ "mem-info",	act_mem_info, 0, 0, "mem-info" },
	{ "mem-dirty",	act_mem_dirty, 1, 1, "mem-dirty:SIZE" },
	{ "balloon-wait", act_balloon_wait, 1, 2, "balloon-wait:SIZE[:SECONDS]" },
};

/* Runs one action item "name[:arg[:arg...]]" of @len characters at @item. */
static void __init run_action(const char *item, size_t len)
{
	static char buf[ACTION_ITEM_MAX] __initdata;
	char *argv[ACTION_ARGS_MAX + 1];
	char *p = buf;
	int argc = 0;
	size_t i;

	if (len >= sizeof(buf)) {
		probe_print("vmmprobe: action too long %.*s", (int)len, item);
		return;
	}
	memcpy(buf, item, len);
	buf[len] = '\0';
	while (p && argc <= ACTION_ARGS_MAX)
		argv[argc++] = strsep(&p, ":");

	for (i = 0; i < ARRAY_SIZE(probe_actions); i++) {
		const struct probe_action *a = &probe_actions[i];

		if (strcmp(a->name, argv[0]))
			continue;
		if (p || argc - 1 < a->min_args || argc - 1 > a->max_args) {
			probe_print("vmmprobe: bad action %.*s usage=%s", (int)len, item,
				    a->usage);
			return;
		}
		a->run(argc, argv);
		return;
	}
	probe_print("vmmprobe: unknown action %s", argv[0]);
}

/* Runs before rootfs_initcall(populate_rootfs), which frees the initrd. */
static int __init vmmprobe_capture_initrd(void)
{
	if (!action || !initrd_start || initrd_end <= initrd_start)
		return 0;

	initrd_seen = true;
	initrd_size = initrd_end - initrd_start;
	/* crc32_le(~0, ...) ^ ~0 is the zlib/IEEE CRC-32 (python's zlib.crc32). */
	if (initrd_crc)
		initrd_crc_value = crc32_le(~0U, (const u8 *)initrd_start, initrd_size) ^ ~0U;
	return 0;
}
fs_initcall_sync(vmmprobe_capture_initrd);

static void __init report_facts(void)
{
	probe_print("vmmprobe: online-cpus=%u", num_online_cpus());
	probe_print("vmmprobe: memory phys-kib=%llu total-kib=%lu",
		    (unsigned long long)memblock_phys_mem_size() / 1024,
		    totalram_pages() << (PAGE_SHIFT - 10));
	if (initrd_seen && initrd_crc)
		probe_print("vmmprobe: initrd size=%lu crc32=%08x",
			    initrd_size, initrd_crc_value);
	else if (initrd_seen)
		probe_print("vmmprobe: initrd size=%lu", initrd_size);
	else
		probe_print("vmmprobe: initrd none");
}

/*
 * Runs after every other initcall (all drivers probed, ip= configured).
 * With actions given it never returns, so the kernel never tries to start
 * user space (nor mounts root= itself: see blk-root).
 */
static int __init vmmprobe_main(void)
{
	const char *p;

	if (!action)
		return 0;

	/*
	 * The kernel applies sysctl.<name>=<value> from the command line only
	 * after every initcall, which this one never lets happen.
	 */
	do_sysctl_args();
	watch_shutdown_path();
	outb(BOOT_TIMER_VALUE, BOOT_TIMER_PORT);
	probe_print("BOOT-COMPLETE");
	report_facts();

	for (p = action; *p; ) {
		size_t len = strcspn(p, ",");

		if (len)
			run_action(p, len);
		p += len;
		if (*p == ',')
			p++;
	}

	probe_print("vmmprobe: actions done");
	probe_idle_forever();
}
late_initcall_sync(vmmprobe_main);
