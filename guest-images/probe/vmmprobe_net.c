// SPDX-License-Identifier: GPL-2.0
/*
 * vmmprobe network actions: kernel sockets standing in for the user-space
 * tools (ping answers come from the kernel itself) that cannot run on the
 * hosts this project is tested on. eth0 is configured by the kernel's ip=.
 *
 * Servers (net-echo, net-udp-echo) run in their own kernel threads, so the
 * action list goes on; bulk transfers (net-send, net-recv) connect to a host
 * address and block until done, one kernel thread per stream.
 */

#include <linux/completion.h>
#include <linux/crc32.h>
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/inet.h>
#include <linux/inetdevice.h>
#include <linux/in.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/net.h>
#include <linux/netdevice.h>
#include <linux/rtnetlink.h>
#include <linux/slab.h>
#include <linux/socket.h>
#include <linux/string.h>
#include <linux/uio.h>
#include <linux/unaligned.h>
#include <net/inet_sock.h>
#include <net/net_namespace.h>
#include <net/sock.h>

#include "vmmprobe.h"

#undef MODULE_PARAM_PREFIX
#define MODULE_PARAM_PREFIX "vmmprobe."

/*
 * How net-recv checksums what it receives: "crc32", "sum64" or "off". Guest
 * kernel code is emulated instruction by instruction on kvm_pvm hosts, where
 * a CRC-32 (ten memory reads per 8 bytes) costs about ten times as much as
 * moving the bytes; sum64 (one read per 8 bytes) lets a test check tens of
 * MiB, and throughput benchmarks turn checking off.
 */
static char *net_sum = "crc32";
module_param(net_sum, charp, 0);

enum net_check { CHECK_CRC32, CHECK_SUM64, CHECK_OFF };

/* -EINVAL for anything but the three names, so a typo fails the transfer loudly. */
static int parse_net_sum(const char *name, enum net_check *check)
{
	if (!strcmp(name, "crc32"))
		*check = CHECK_CRC32;
	else if (!strcmp(name, "sum64"))
		*check = CHECK_SUM64;
	else if (!strcmp(name, "off"))
		*check = CHECK_OFF;
	else
		return -EINVAL;
	return 0;
}

/*
 * sum64: a Fletcher-style sum over the stream as little-endian 64-bit words,
 * the last one zero-padded: a += word, b += a, both modulo 2^64. b makes it
 * depend on the order of the words; the byte count (printed beside it) makes
 * the padding unambiguous.
 */
struct sum64 {
	u64 a, b;
	u8 tail[8];
	unsigned int tail_len;
};

static void sum64_word(struct sum64 *s, u64 word)
{
	s->a += word;
	s->b += s->a;
}

static void sum64_update(struct sum64 *s, const u8 *p, size_t n)
{
	u64 a, b;

	while (s->tail_len && n) {
		s->tail[s->tail_len++] = *p++;
		n--;
		if (s->tail_len == 8) {
			sum64_word(s, get_unaligned_le64(s->tail));
			s->tail_len = 0;
		}
	}
	a = s->a;
	b = s->b;
	for (; n >= 8; p += 8, n -= 8) {
		a += get_unaligned_le64(p);
		b += a;
	}
	s->a = a;
	s->b = b;
	memcpy(s->tail + s->tail_len, p, n);
	s->tail_len += n;
}

static void sum64_finish(struct sum64 *s)
{
	if (s->tail_len) {
		memset(s->tail + s->tail_len, 0, 8 - s->tail_len);
		sum64_word(s, get_unaligned_le64(s->tail));
		s->tail_len = 0;
	}
}

/* Per-read/write buffer of every transfer and server. */
#define NET_BUF_BYTES		(64 * 1024)
/* Most parallel streams of one net-send / net-recv. */
#define NET_STREAMS_MAX		16
/* How long a connect keeps retrying while the host side is not there yet. */
#define NET_CONNECT_WAIT_SECS	60

void act_net_info(int argc, char **argv)
{
	struct net_device *dev;

	rtnl_lock();
	for_each_netdev(&init_net, dev) {
		__be32 addr;

		if (dev->flags & IFF_LOOPBACK)
			continue;
		addr = inet_select_addr(dev, 0, RT_SCOPE_UNIVERSE);
		probe_print("vmmprobe: net-info dev=%s mac=%pM ip=%pI4 up=%d carrier=%d mtu=%u",
			    dev->name, dev->dev_addr, &addr, !!(dev->flags & IFF_UP),
			    netif_carrier_ok(dev) ? 1 : 0, dev->mtu);
	}
	rtnl_unlock();
}

/* Brings @name up and gives it @ip/@prefix, like "ip addr add" and "ip link set up". */
static int net_set_addr(const char *name, __be32 ip, unsigned int prefix)
{
	struct ifreq ifr = { };
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	struct net_device *dev;
	int err;

	rtnl_lock();
	dev = __dev_get_by_name(&init_net, name);
	err = dev ? dev_change_flags(dev, dev->flags | IFF_UP, NULL) : -ENODEV;
	rtnl_unlock();
	if (err)
		return err;
	strscpy(ifr.ifr_name, name, IFNAMSIZ);
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = ip;
	err = devinet_ioctl(&init_net, SIOCSIFADDR, &ifr);
	if (err)
		return err;
	sin->sin_addr.s_addr = prefix ? htonl(~0U << (32 - prefix)) : 0;
	return devinet_ioctl(&init_net, SIOCSIFNETMASK, &ifr);
}

void act_net_addr(int argc, char **argv)
{
	unsigned int prefix;
	__be32 ip;

	if (!in4_pton(argv[2], -1, (u8 *)&ip, -1, NULL) || kstrtouint(argv[3], 10, &prefix) ||
	    prefix > 32 || strlen(argv[1]) >= IFNAMSIZ) {
		probe_print("vmmprobe: bad action arguments: %s:%s:%s", argv[1], argv[2], argv[3]);
		return;
	}
	probe_print("vmmprobe: net-addr dev=%s ip=%pI4/%u result=%d", argv[1], &ip, prefix,
		    net_set_addr(argv[1], ip, prefix));
}

static int parse_port(const char *s, u16 *port)
{
	return kstrtou16(s, 10, port) || !*port ? -EINVAL : 0;
}

static int parse_addr(const char *ip, const char *port, struct sockaddr_in *sin)
{
	u16 p;

	memset(sin, 0, sizeof(*sin));
	sin->sin_family = AF_INET;
	if (!in4_pton(ip, -1, (u8 *)&sin->sin_addr.s_addr, -1, NULL) || parse_port(port, &p))
		return -EINVAL;
	sin->sin_port = htons(p);
	return 0;
}

static int net_send_all(struct socket *sock, const u8 *buf, size_t len)
{
	while (len) {
		struct msghdr msg = { .msg_flags = MSG_NOSIGNAL };
		struct kvec vec = { .iov_base = (void *)buf, .iov_len = len };
		int n = kernel_sendmsg(sock, &msg, &vec, 1, len);

		if (n < 0)
			return n;
		if (!n)
			return -EPIPE;
		buf += n;
		len -= n;
	}
	return 0;
}

/* ---- Servers --------------------------------------------------------------- */

struct echo_conn {
	struct socket *sock;
	u16 port;
};

static int echo_conn_thread(void *data)
{
	struct echo_conn *conn = data;
	u64 total = 0;
	int ret = 0;
	u8 *buf = kmalloc(NET_BUF_BYTES, GFP_KERNEL);

	while (buf) {
		struct msghdr msg = { };
		struct kvec vec = { .iov_base = buf, .iov_len = NET_BUF_BYTES };
		int n = kernel_recvmsg(conn->sock, &msg, &vec, 1, NET_BUF_BYTES, 0);

		if (n <= 0) {
			ret = n;
			break;
		}
		ret = net_send_all(conn->sock, buf, n);
		if (ret)
			break;
		total += n;
	}
	if (!buf)
		ret = -ENOMEM;
	probe_print("vmmprobe: net-echo port=%u closed bytes=%llu result=%d", conn->port, total, ret);
	kfree(buf);
	sock_release(conn->sock);
	kfree(conn);
	return 0;
}

static int echo_listen_thread(void *data)
{
	struct socket *listener = data;
	u16 port = ntohs(inet_sk(listener->sk)->inet_sport);

	for (;;) {
		struct socket *sock;
		struct echo_conn *conn;
		struct task_struct *t;
		int err = kernel_accept(listener, &sock, 0);

		if (err) {
			probe_print("vmmprobe: net-echo port=%u accept result=%d", port, err);
			msleep(100);
			continue;
		}
		conn = kmalloc(sizeof(*conn), GFP_KERNEL);
		if (!conn) {
			sock_release(sock);
			continue;
		}
		conn->sock = sock;
		conn->port = port;
		t = kthread_run(echo_conn_thread, conn, "vmmprobe-echo-c");
		if (IS_ERR(t)) {
			sock_release(sock);
			kfree(conn);
		}
	}
	return 0;
}

static int udp_echo_thread(void *data)
{
	struct socket *sock = data;
	u8 *buf = kmalloc(NET_BUF_BYTES, GFP_KERNEL);

	if (!buf)
		return -ENOMEM;
	for (;;) {
		struct sockaddr_in peer;
		struct msghdr msg = { .msg_name = &peer, .msg_namelen = sizeof(peer) };
		struct kvec vec = { .iov_base = buf, .iov_len = NET_BUF_BYTES };
		int n = kernel_recvmsg(sock, &msg, &vec, 1, NET_BUF_BYTES, 0);
		struct msghdr reply = { .msg_name = &peer, .msg_namelen = sizeof(peer) };

		if (n < 0) {
			msleep(100);
			continue;
		}
		vec.iov_len = n;
		kernel_sendmsg(sock, &reply, &vec, 1, n);
	}
	return 0;
}

/* Binds a socket of @type to 0.0.0.0:@port and starts @fn on it. */
static void start_server(const char *what, int type, const char *port_arg,
			 int (*fn)(void *), const char *thread)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	struct socket *sock;
	struct task_struct *t;
	u16 port;
	int err;

	if (parse_port(port_arg, &port)) {
		probe_print("vmmprobe: bad action arguments: %s", port_arg);
		return;
	}
	sin.sin_port = htons(port);
	err = sock_create_kern(&init_net, AF_INET, type, 0, &sock);
	if (err)
		goto out;
	sock_set_reuseaddr(sock->sk);
	err = kernel_bind(sock, (struct sockaddr *)&sin, sizeof(sin));
	if (!err && type == SOCK_STREAM)
		err = kernel_listen(sock, 16);
	if (err) {
		sock_release(sock);
		goto out;
	}
	t = kthread_run(fn, sock, thread);
	if (IS_ERR(t)) {
		err = PTR_ERR(t);
		sock_release(sock);
	}
out:
	probe_print("vmmprobe: %s port=%u listening result=%d", what, port, err);
}

void act_net_echo(int argc, char **argv)
{
	start_server("net-echo", SOCK_STREAM, argv[1], echo_listen_thread, "vmmprobe-echo");
}

void act_net_udp_echo(int argc, char **argv)
{
	start_server("net-udp-echo", SOCK_DGRAM, argv[1], udp_echo_thread, "vmmprobe-udp");
}

/* ---- Bulk transfers ---------------------------------------------------------- */

struct stream {
	struct sockaddr_in dst;
	bool send;
	enum net_check check;	/* net-recv: how received bytes are checked */
	u64 want;		/* net-send: bytes to send */
	u32 seed;
	/* Results. */
	u64 bytes;
	u32 crc;
	struct sum64 sum;
	s64 ms;
	int result;
	struct completion done;
};

static int stream_connect(struct stream *s, struct socket **res)
{
	unsigned long deadline = jiffies + NET_CONNECT_WAIT_SECS * HZ;
	int err;

	for (;;) {
		err = sock_create_kern(&init_net, AF_INET, SOCK_STREAM, IPPROTO_TCP, res);
		if (err)
			return err;
		err = kernel_connect(*res, (struct sockaddr *)&s->dst, sizeof(s->dst), 0);
		if (!err)
			return 0;
		sock_release(*res);
		*res = NULL;
		/* The host side may not listen yet, or the link may still be coming up. */
		if ((err != -ECONNREFUSED && err != -ENETUNREACH && err != -EHOSTUNREACH &&
		     err != -ETIMEDOUT) || time_after(jiffies, deadline))
			return err;
		msleep(200);
	}
}

static int stream_run(struct stream *s, struct socket *sock, u8 *buf)
{
	u64 state = pattern_init(s->seed);
	u32 block_crc;

	if (s->send) {
		/*
		 * The first NET_BUF_BYTES of the pattern, sent again and again: making
		 * and checksumming every byte would cost the emulated guest more than
		 * the transfer. The CRC of a full block is folded in with
		 * crc32_le_shift (CRC is linear), so only the block is checksummed.
		 */
		pattern_fill(buf, NET_BUF_BYTES, &state);
		block_crc = crc32_le(0, buf, NET_BUF_BYTES);
		while (s->bytes < s->want) {
			size_t n = min_t(u64, NET_BUF_BYTES, s->want - s->bytes);
			int err = net_send_all(sock, buf, n);

			if (err)
				return err;
			if (n == NET_BUF_BYTES)
				s->crc = crc32_le_shift(s->crc, n) ^ block_crc;
			else
				s->crc = crc32_le(s->crc, buf, n);
			s->bytes += n;
		}
		return kernel_sock_shutdown(sock, SHUT_WR);
	}
	for (;;) {
		struct msghdr msg = { };
		struct kvec vec = { .iov_base = buf, .iov_len = NET_BUF_BYTES };
		int n = kernel_recvmsg(sock, &msg, &vec, 1, NET_BUF_BYTES, 0);

		if (n < 0)
			return n;
		if (!n)
			return 0;
		if (s->check == CHECK_CRC32)
			s->crc = crc32_le(s->crc, buf, n);
		else if (s->check == CHECK_SUM64)
			sum64_update(&s->sum, buf, n);
		s->bytes += n;
	}
}

static int stream_thread(void *data)
{
	struct stream *s = data;
	struct socket *sock = NULL;
	u8 *buf = kmalloc(NET_BUF_BYTES, GFP_KERNEL);
	ktime_t start = ktime_get();

	s->crc = CRC_INIT;
	s->result = buf ? stream_connect(s, &sock) : -ENOMEM;
	if (!s->result)
		s->result = stream_run(s, sock, buf);
	s->ms = ktime_ms_delta(ktime_get(), start);
	s->crc = crc_final(s->crc);
	sum64_finish(&s->sum);
	if (sock)
		sock_release(sock);
	kfree(buf);
	complete(&s->done);
	return 0;
}

static void bulk(const char *what, bool send, const char *ip, const char *port,
		 const char *bytes, const char *streams_arg)
{
	struct sockaddr_in dst;
	struct stream *streams;
	/* net-send folds a CRC-32 of its repeated block in cheaply, so it always reports one. */
	enum net_check check = CHECK_CRC32;
	unsigned int n = 1, i;
	u64 want = 0, total = 0;
	ktime_t start;
	int result = 0;

	if (parse_addr(ip, port, &dst) || (bytes && parse_bytes(bytes, &want)) ||
	    (streams_arg && (kstrtouint(streams_arg, 10, &n) || !n || n > NET_STREAMS_MAX))) {
		probe_print("vmmprobe: bad action arguments: %s:%s%s%s%s%s", ip, port,
			    bytes ? ":" : "", bytes ? bytes : "", streams_arg ? ":" : "",
			    streams_arg ? streams_arg : "");
		return;
	}
	if (!send && parse_net_sum(net_sum, &check)) {
		probe_print("vmmprobe: %s bad vmmprobe.net_sum=%s (crc32, sum64 or off)", what, net_sum);
		probe_print("vmmprobe: %s total streams=%u bytes=0 ms=0 result=%d", what, n, -EINVAL);
		return;
	}
	streams = kcalloc(n, sizeof(*streams), GFP_KERNEL);
	if (!streams) {
		probe_print("vmmprobe: %s total streams=%u bytes=0 ms=0 result=%d", what, n, -ENOMEM);
		return;
	}
	start = ktime_get();
	for (i = 0; i < n; i++) {
		struct stream *s = &streams[i];
		struct task_struct *t;

		s->dst = dst;
		s->send = send;
		s->check = check;
		s->want = want;
		s->seed = i + 1;
		init_completion(&s->done);
		t = kthread_run(stream_thread, s, "vmmprobe-net%u", i);
		if (IS_ERR(t)) {
			s->result = PTR_ERR(t);
			complete(&s->done);
		}
	}
	for (i = 0; i < n; i++) {
		struct stream *s = &streams[i];
		char hex[33];

		wait_for_completion(&s->done);
		if (check == CHECK_SUM64 && !s->result)
			snprintf(hex, sizeof(hex), "%016llx%016llx", s->sum.a, s->sum.b);
		else if (check == CHECK_SUM64)
			strscpy(hex, "none", sizeof(hex));
		else if (check == CHECK_CRC32)
			crc_str(hex, s->crc, s->result);
		else
			strscpy(hex, "off", sizeof(hex));
		probe_print("vmmprobe: %s stream=%u peer=%pI4:%u seed=%u bytes=%llu %s=%s ms=%lld result=%d",
			    what, i, &dst.sin_addr, ntohs(dst.sin_port), s->seed, s->bytes,
			    check == CHECK_SUM64 ? "sum64" : "crc32", hex, s->ms, s->result);
		total += s->bytes;
		if (s->result && !result)
			result = s->result;
	}
	probe_print("vmmprobe: %s total streams=%u bytes=%llu ms=%lld result=%d", what, n, total,
		    ktime_ms_delta(ktime_get(), start), result);
	kfree(streams);
}

void act_net_send(int argc, char **argv)
{
	bulk("net-send", true, argv[1], argv[2], argv[3], argc > 4 ? argv[4] : NULL);
}

void act_net_recv(int argc, char **argv)
{
	bulk("net-recv", false, argv[1], argv[2], NULL, argc > 3 ? argv[3] : NULL);
}
