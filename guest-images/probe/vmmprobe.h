/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the probe's source files share: console output, argument parsing and
 * the deterministic data pattern (see guest-images/README.md).
 */
#ifndef VMMPROBE_H
#define VMMPROBE_H

#include <linux/kernel.h>
#include <linux/printk.h>
#include <linux/string.h>
#include <linux/types.h>
#include <linux/unaligned.h>

/*
 * All probe output goes through this: KERN_EMERG reaches the console even
 * with "quiet", and the text is printed exactly, without any prefix.
 */
#define probe_print(fmt, ...) pr_emerg(fmt "\n", ##__VA_ARGS__)

/* zlib/IEEE CRC-32 (python's zlib.crc32) is crc32_le(~0, ...) ^ ~0. */
#define CRC_INIT		(~0U)
#define crc_final(c)		((c) ^ ~0U)

/*
 * The data blk-write and net-send write, documented in guest-images/README.md
 * so that host-side tests can reproduce it: Marsaglia's xorshift64 (13, 7, 17)
 * with the initial state (SEED << 32) | 0x9e3779b9 (never zero, one stream per
 * 32-bit seed); every step's 64-bit state is stored little-endian, 8 bytes,
 * the first step's at the first byte written.
 */
static inline u64 pattern_init(u32 seed)
{
	return ((u64)seed << 32) | 0x9e3779b9;
}

/* Fills @len bytes (a multiple of 8) and advances @state. */
static inline void pattern_fill(u8 *buf, size_t len, u64 *state)
{
	u64 x = *state;
	size_t i;

	for (i = 0; i + 8 <= len; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		put_unaligned_le64(x, buf + i);
	}
	*state = x;
}

/* A size with an optional k/m/g suffix ("64k"); -EINVAL if malformed. */
static inline int parse_bytes(const char *s, u64 *value)
{
	char *end;

	if (!*s)
		return -EINVAL;
	*value = memparse(s, &end);
	return *end ? -EINVAL : 0;
}

/* Formats a CRC-32 for an output line: 8 hex digits, or "-" after an error. */
static inline const char *crc_str(char buf[9], u32 crc, int result)
{
	if (result)
		return "-";
	snprintf(buf, 9, "%08x", crc);
	return buf;
}

/* Network actions (vmmprobe_net.c). */
void act_net_info(int argc, char **argv);
void act_net_addr(int argc, char **argv);
void act_net_echo(int argc, char **argv);
void act_net_udp_echo(int argc, char **argv);
void act_net_send(int argc, char **argv);
void act_net_recv(int argc, char **argv);

/* Memory and balloon actions (vmmprobe_mem.c). */
void act_mem_alloc(int argc, char **argv);
void act_mem_free(int argc, char **argv);
void act_mem_info(int argc, char **argv);
void act_mem_dirty(int argc, char **argv);
void act_balloon_wait(int argc, char **argv);

/* Block devices opened without a holder (vmmprobe.c). */
struct file;
struct file *probe_disk_open(const char *name, bool write);
void probe_disk_close(struct file *file);

/* The disk-dirtying load (vmmprobe_blk_dirty.c). */
void act_blk_dirty(int argc, char **argv);

/* File system actions (vmmprobe_fs.c). */
void act_fs_write(int argc, char **argv);
void probe_fs_unmount_all(void);

#endif /* VMMPROBE_H */
