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

#include <linux/cpumask.h>
#include <linux/crc32.h>
#include <linux/delay.h>
#include <linux/init.h>
#include <linux/initrd.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/memblock.h>
#include <linux/mm.h>
#include <linux/moduleparam.h>
#include <linux/panic.h>
#include <linux/printk.h>
#include <linux/reboot.h>
#include <linux/string.h>

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

/* Captured before populate_rootfs() frees the initrd memory. */
static bool initrd_seen;
static unsigned long initrd_size;
static u32 initrd_crc_value;

/*
 * All probe output goes through this: KERN_EMERG reaches the console even
 * with "quiet", and the text is printed exactly, without any prefix.
 */
#define probe_print(fmt, ...) pr_emerg(fmt "\n", ##__VA_ARGS__)

static void __noreturn probe_idle_forever(void)
{
	for (;;)
		msleep_interruptible(60 * MSEC_PER_SEC);
}

static void act_poweroff(void)
{
	kernel_power_off();
}

static void act_reboot(void)
{
	kernel_restart(NULL);
}

static void act_panic(void)
{
	panic("vmmprobe: requested panic");
}

static void act_counter(void)
{
	unsigned int i;

	for (i = 1; i <= count; i++) {
		if (i > 1)
			msleep(100);
		probe_print("vmmprobe: counter=%u", i);
	}
}

static void act_idle(void)
{
	probe_print("vmmprobe: idle");
	probe_idle_forever();
}

struct probe_action {
	const char *name;
	void (*run)(void);
};

static const struct probe_action probe_actions[] = {
	{ "poweroff",	act_poweroff },
	{ "reboot",	act_reboot },
	{ "panic",	act_panic },
	{ "counter",	act_counter },
	{ "idle",	act_idle },
};

static void run_action(const char *name, size_t len)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(probe_actions); i++) {
		const struct probe_action *a = &probe_actions[i];

		if (strlen(a->name) == len && !strncmp(a->name, name, len)) {
			a->run();
			return;
		}
	}
	probe_print("vmmprobe: unknown action %.*s", (int)len, name);
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
 * user space.
 */
static int __init vmmprobe_main(void)
{
	const char *p;

	if (!action)
		return 0;

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
