// SPDX-License-Identifier: GPL-2.0
/*
 * blk-dirty: a kernel thread that keeps rewriting the first SPAN bytes of a
 * disk, pass after pass, and checks on every pass what the previous one wrote.
 * It is the disk side of what a live migration must carry: a block the VMM
 * failed to copy (or copied stale) reads back with another pass's stamp.
 *
 * Each 4 KiB block starts with a stamp of (pass, block); a pass reads a chunk,
 * checks every block's stamp against the previous pass, writes its own and
 * writes the chunk back (direct bios, no page cache).
 */

#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/jiffies.h>
#include <linux/kthread.h>
#include <linux/mm.h>
#include <linux/sched.h>
#include <linux/slab.h>

#include "vmmprobe.h"

#define DIRTY_BLOCK		4096
#define DIRTY_CHUNK		(256 * 1024)

struct blk_dirty {
	struct file *file;
	struct page *page;
	u64 span;
	char dev[32];
};

static u64 blk_dirty_stamp(u64 pass, u64 block)
{
	return (pass * 0x9e3779b97f4a7c15ULL) ^ (block << 24) ^ 0xd15c;
}

static int blk_dirty_io(struct block_device *bdev, struct page *page, bool write, u64 off,
			unsigned int len)
{
	struct bio *bio;
	int ret;

	bio = bio_alloc(bdev, 1, write ? REQ_OP_WRITE : REQ_OP_READ, GFP_KERNEL);
	bio->bi_iter.bi_sector = off >> SECTOR_SHIFT;
	__bio_add_page(bio, page, len, 0);
	ret = submit_bio_wait(bio);
	bio_put(bio);
	return ret;
}

static int blk_dirty_thread(void *arg)
{
	struct blk_dirty *s = arg;
	struct block_device *bdev = file_bdev(s->file);
	u8 *buf = page_address(s->page);
	unsigned long next_report = jiffies + HZ;
	u64 pass, off, errors = 0, written = 0;
	int ret;

	for (pass = 0; !kthread_should_stop(); pass++) {
		for (off = 0; off < s->span; off += DIRTY_CHUNK) {
			unsigned int len = min_t(u64, DIRTY_CHUNK, s->span - off);
			unsigned int i;

			ret = blk_dirty_io(bdev, s->page, false, off, len);
			if (!ret) {
				for (i = 0; i < len; i += DIRTY_BLOCK) {
					u64 block = (off + i) / DIRTY_BLOCK;

					if (pass > 0 &&
					    get_unaligned_le64(buf + i) != blk_dirty_stamp(pass - 1, block)) {
						if (!errors)
							probe_print("vmmprobe: blk-dirty mismatch block=%llu pass=%llu",
								    (unsigned long long)block,
								    (unsigned long long)pass);
						errors++;
					}
					put_unaligned_le64(blk_dirty_stamp(pass, block), buf + i);
				}
				ret = blk_dirty_io(bdev, s->page, true, off, len);
			}
			if (ret) {
				if (!errors)
					probe_print("vmmprobe: blk-dirty io-error offset=%llu result=%d",
						    (unsigned long long)off, ret);
				errors++;
				/* A failing disk is not a reason to spin. */
				msleep_interruptible(100);
			} else {
				written += len;
			}
			cond_resched();
		}
		if (time_after(jiffies, next_report)) {
			next_report = jiffies + HZ;
			probe_print("vmmprobe: blk-dirty dev=%s passes=%llu bytes=%llu errors=%llu", s->dev,
				    (unsigned long long)pass + 1, (unsigned long long)written,
				    (unsigned long long)errors);
		}
	}
	return 0;
}

void act_blk_dirty(int argc, char **argv)
{
	struct task_struct *t;
	struct blk_dirty *s;
	u64 span;
	int ret = 0;

	if (parse_bytes(argv[2], &span) || !span || span % DIRTY_BLOCK) {
		probe_print("vmmprobe: bad action arguments: %s", argv[2]);
		return;
	}
	s = kzalloc(sizeof(*s), GFP_KERNEL);
	if (!s) {
		ret = -ENOMEM;
		goto out;
	}
	strscpy(s->dev, argv[1], sizeof(s->dev));
	s->span = span;
	s->file = probe_disk_open(argv[1], true);
	if (IS_ERR(s->file)) {
		ret = PTR_ERR(s->file);
		goto free;
	}
	if (span > bdev_nr_bytes(file_bdev(s->file))) {
		ret = -EINVAL;
		goto close;
	}
	s->page = alloc_pages(GFP_KERNEL, get_order(DIRTY_CHUNK));
	if (!s->page) {
		ret = -ENOMEM;
		goto close;
	}
	t = kthread_run(blk_dirty_thread, s, "vmmprobe-blkdirty");
	if (!IS_ERR(t))
		goto out;
	ret = PTR_ERR(t);
	__free_pages(s->page, get_order(DIRTY_CHUNK));
close:
	probe_disk_close(s->file);
free:
	kfree(s);
out:
	probe_print("vmmprobe: blk-dirty started dev=%s span-bytes=%llu result=%d", argv[1],
		    (unsigned long long)span, ret);
}
