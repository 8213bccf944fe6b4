// SPDX-License-Identifier: GPL-2.0
/*
 * vmmprobe memory actions: hold and release guest memory, and watch the
 * virtio balloon, so that host-side tests can see the balloon, free page
 * reporting and the host's memory counters react (see guest-images/README.md).
 *
 * The balloon driver keeps its size private; the probe reads it from the
 * BALLOON_INFLATE / BALLOON_DEFLATE vm events (one per 4 KiB page), which
 * count exactly the pages the driver moved in and out of the balloon.
 */

#include <linux/delay.h>
#include <linux/gfp.h>
#include <linux/jiffies.h>
#include <linux/kthread.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/vmstat.h>

#include "vmmprobe.h"

/* Pages held by mem-alloc, linked through page->lru. */
static LIST_HEAD(held_pages);
static unsigned long held_count;

/* Pages in the balloon now: inflations minus deflations so far. */
static long balloon_pages(void)
{
#if defined(CONFIG_VM_EVENT_COUNTERS) && defined(CONFIG_MEMORY_BALLOON)
	unsigned long *events;
	long pages;

	events = kcalloc(NR_VM_EVENT_ITEMS, sizeof(*events), GFP_KERNEL);
	if (!events)
		return -ENOMEM;
	all_vm_events(events);
	pages = (long)(events[BALLOON_INFLATE] - events[BALLOON_DEFLATE]);
	kfree(events);
	return pages;
#else
	return -EOPNOTSUPP;
#endif
}

/*
 * mem-alloc:SIZE[:oom] - allocates SIZE bytes as single pages and writes one
 * word into each (its PFN: non-zero, different per page), so that the host has
 * to back every one of them. By default it never enters the OOM path
 * (__GFP_NORETRY): a shortfall is reported as -12 with the pages that were
 * obtained kept. With "oom" it allocates as an ordinary kernel user does
 * (GFP_KERNEL), so a shortage runs the OOM notifiers, where a balloon with
 * deflate-on-OOM gives pages back. Only for tests that leave the balloon
 * enough to give: with no user space to kill, an OOM that nothing relieves
 * panics the guest.
 */
void act_mem_alloc(int argc, char **argv)
{
	gfp_t gfp = GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN;
	unsigned long want, got = 0;
	u64 bytes;
	int ret = 0;

	if (parse_bytes(argv[1], &bytes) || bytes < PAGE_SIZE ||
	    (argc > 2 && strcmp(argv[2], "oom"))) {
		probe_print("vmmprobe: bad action arguments: %s", argv[1]);
		return;
	}
	if (argc > 2)
		gfp = GFP_KERNEL | __GFP_NOWARN;
	want = bytes >> PAGE_SHIFT;
	while (got < want) {
		struct page *page = alloc_page(gfp);

		if (!page) {
			ret = -ENOMEM;
			break;
		}
		*(unsigned long *)page_address(page) = page_to_pfn(page);
		list_add_tail(&page->lru, &held_pages);
		got++;
		if (!(got % 4096))
			cond_resched();
	}
	held_count += got;
	probe_print("vmmprobe: mem-alloc bytes=%llu pages=%lu held-pages=%lu result=%d",
		    (unsigned long long)got << PAGE_SHIFT, got, held_count, ret);
}

/*
 * mem-free[:odd] - frees the pages mem-alloc holds: all of them, or only
 * those with an odd PFN. Freeing every other page leaves free memory the
 * host still backs but that cannot merge into the large blocks free page
 * reporting hands back, which is what a balloon inflation then takes first.
 */
void act_mem_free(int argc, char **argv)
{
	bool odd = argc > 1;
	struct page *page, *next;
	unsigned long freed = 0;

	if (odd && strcmp(argv[1], "odd")) {
		probe_print("vmmprobe: bad action arguments: %s", argv[1]);
		return;
	}
	list_for_each_entry_safe(page, next, &held_pages, lru) {
		if (odd && !(page_to_pfn(page) & 1))
			continue;
		list_del(&page->lru);
		__free_page(page);
		freed++;
		if (!(freed % 4096))
			cond_resched();
	}
	held_count -= freed;
	probe_print("vmmprobe: mem-free which=%s pages=%lu held-pages=%lu",
		    odd ? "odd" : "all", freed, held_count);
}

/*
 * balloon-wait:SIZE[:SECONDS] - waits until the balloon holds exactly SIZE
 * bytes (polled every 100 ms, for at most SECONDS, default 600): the host has
 * set that target and the guest driver has reached it.
 */
void act_balloon_wait(int argc, char **argv)
{
	unsigned int seconds = 600;
	unsigned long deadline;
	long pages, target;
	u64 bytes;
	int ret = 0;

	if (parse_bytes(argv[1], &bytes) ||
	    (argc > 2 && kstrtouint(argv[2], 0, &seconds))) {
		probe_print("vmmprobe: bad action arguments: %s", argv[1]);
		return;
	}
	target = bytes >> PAGE_SHIFT;
	deadline = jiffies + (unsigned long)seconds * HZ;
	for (;;) {
		pages = balloon_pages();
		if (pages < 0) {
			ret = pages;
			break;
		}
		if (pages == target)
			break;
		if (time_after(jiffies, deadline)) {
			ret = -ETIMEDOUT;
			break;
		}
		msleep(100);
	}
	probe_print("vmmprobe: balloon-wait bytes=%llu pages=%ld result=%d",
		    (unsigned long long)bytes, pages < 0 ? 0 : pages, ret);
}

/* mem-info - the guest's view of its memory and of the balloon. */
void act_mem_info(int argc, char **argv)
{
	long pages = balloon_pages();

	probe_print("vmmprobe: mem-info total-kib=%lu free-kib=%lu balloon-kib=%ld held-kib=%lu",
		    totalram_pages() << (PAGE_SHIFT - 10),
		    global_zone_page_state(NR_FREE_PAGES) << (PAGE_SHIFT - 10),
		    pages < 0 ? pages : pages << (PAGE_SHIFT - 10),
		    held_count << (PAGE_SHIFT - 10));
}

/*
 * mem-dirty:SIZE - a kernel thread that owns a SIZE-byte buffer and writes
 * one word of every page of it, pass after pass, at full speed: the load a
 * live migration must converge under. Pass n writes word (n % 512) of page i
 * with a value derived from (n, i) after checking that word (n - 1) % 512
 * still holds what pass n - 1 wrote there: a page that arrived stale or
 * damaged at a migration's destination is counted as an error. Once a
 * second it prints passes, bytes written and errors so far.
 */
struct dirty_state {
	u64 *buf;
	unsigned long pages;
};

static u64 dirty_value(u64 pass, unsigned long page)
{
	return (pass * 0x9e3779b97f4a7c15ULL) ^ ((u64)page << 20) ^ 0x5eed;
}

static int dirty_thread(void *arg)
{
	struct dirty_state *s = arg;
	const unsigned long words = PAGE_SIZE / sizeof(u64);
	unsigned long next_report = jiffies + HZ, i;
	u64 pass, errors = 0, written = 0;

	for (pass = 0; !kthread_should_stop(); pass++) {
		for (i = 0; i < s->pages; i++) {
			u64 *page = s->buf + i * words;

			if (pass > 0 && page[(pass - 1) % words] != dirty_value(pass - 1, i)) {
				if (!errors)
					probe_print("vmmprobe: mem-dirty mismatch page=%lu pass=%llu",
						    i, (unsigned long long)pass);
				errors++;
			}
			page[pass % words] = dirty_value(pass, i);
			written += PAGE_SIZE;
			if (!(i % 1024))
				cond_resched();
		}
		if (time_after(jiffies, next_report)) {
			next_report = jiffies + HZ;
			probe_print("vmmprobe: mem-dirty passes=%llu bytes=%llu errors=%llu",
				    (unsigned long long)pass + 1, (unsigned long long)written,
				    (unsigned long long)errors);
		}
	}
	return 0;
}

void act_mem_dirty(int argc, char **argv)
{
	struct dirty_state *s;
	struct task_struct *t;
	u64 bytes;

	if (parse_bytes(argv[1], &bytes) || bytes < PAGE_SIZE) {
		probe_print("vmmprobe: bad action arguments: %s", argv[1]);
		return;
	}
	s = kzalloc(sizeof(*s), GFP_KERNEL);
	if (s) {
		s->pages = bytes >> PAGE_SHIFT;
		s->buf = vzalloc(s->pages << PAGE_SHIFT);
	}
	if (!s || !s->buf) {
		kfree(s);
		probe_print("vmmprobe: mem-dirty bytes=%llu result=%d", (unsigned long long)bytes, -ENOMEM);
		return;
	}
	t = kthread_run(dirty_thread, s, "vmmprobe-dirty");
	probe_print("vmmprobe: mem-dirty started bytes=%llu result=%d",
		    (unsigned long long)s->pages << PAGE_SHIFT, IS_ERR(t) ? (int)PTR_ERR(t) : 0);
}
