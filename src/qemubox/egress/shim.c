/*
 * qemubox's egress shim: preloaded into QEMU, it stands between QEMU's user networking
 * (libslirp) and the host's sockets, so that a guest's connections meet its egress rules.
 *
 * Two modes, from the environment:
 * - QEMUBOX_EGRESS=PATH: every TCP connection the guest opens is handed to qemubox's
 *   egress proxy listening on PATH (a SOCK_SEQPACKET socket, connected as QEMU starts,
 *   before it drops privileges): one end of a fresh socket pair goes over with the
 *   destination, the proxy answers allowed (1 byte) or closes it, and the other end takes
 *   the place of slirp's socket. DNS datagrams go to the proxy's resolver instead of the
 *   host's; every other datagram (UDP, ICMP) is refused. Without the proxy, nothing leaves.
 * - QEMUBOX_EGRESS_REFUSE=ADDR,...: connections and datagrams to those addresses are
 *   refused, everything else is QEMU's as usual (--net user).
 * Sockets that are not IPv4 or IPv6 (QEMU's own Unix sockets) are never touched.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_REFUSED 16
#define MAX_FDS 65536
#define VERDICT_MS 5000
#define CONNECT_TRIES 1000 /* 10 s */
#define GREETING_MS 10000

enum { PASS, REFUSE_LIST, GREETING, PROXY, CLOSED };
enum { MSG_CONNECT = 1, MSG_DATAGRAM = 2 };

static int mode = PASS;
static int control = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct sockaddr_in dns4;
static struct sockaddr_in6 dns6;
static struct {
	int family;
	unsigned char addr[16];
} refused[MAX_REFUSED];
static int nrefused;
/* A datagram socket's DNS server as the guest addressed it, to answer from it. */
static struct sockaddr_storage *asked;

static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static ssize_t (*real_recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);

static void parse_refused(const char *list)
{
	char buf[1024], *save = NULL, *tok;
	strncpy(buf, list, sizeof(buf) - 1);
	buf[sizeof(buf) - 1] = 0;
	for (tok = strtok_r(buf, ",", &save); tok && nrefused < MAX_REFUSED;
	     tok = strtok_r(NULL, ",", &save)) {
		if (inet_pton(AF_INET, tok, refused[nrefused].addr) == 1)
			refused[nrefused++].family = AF_INET;
		else if (inet_pton(AF_INET6, tok, refused[nrefused].addr) == 1)
			refused[nrefused++].family = AF_INET6;
	}
}

/* Connect to the proxy as QEMU starts (before it drops privileges); the proxy's greeting
 * (where its resolver listens) is read when first needed, so that QEMU and the proxy get
 * ready side by side. */
static void join(const char *path)
{
	struct sockaddr_un sun = {.sun_family = AF_UNIX};
	mode = CLOSED; /* until the proxy greets us */
	if (strlen(path) >= sizeof(sun.sun_path))
		return;
	strcpy(sun.sun_path, path);
	control = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (control < 0)
		return;
	/* The keeper starts QEMU once the proxy's socket is there; should the proxy be slow
	 * to listen all the same, wait for it a while: without it, nothing leaves. */
	int tries = CONNECT_TRIES, ok;
	while (!(ok = real_connect(control, (struct sockaddr *)&sun, sizeof(sun)) == 0) &&
	       (errno == ENOENT || errno == ECONNREFUSED) && --tries > 0)
		usleep(10000);
	if (!ok) {
		close(control);
		control = -1;
		return;
	}
	mode = GREETING;
}

/* The proxy's greeting: its resolver's ports (IPv4, IPv6). */
static int greeted(void)
{
	unsigned char reply[4];
	pthread_mutex_lock(&lock);
	if (mode == GREETING) {
		struct pollfd p = {control, POLLIN, 0};
		mode = CLOSED;
		if (poll(&p, 1, GREETING_MS) == 1 && recv(control, reply, sizeof(reply), 0) == 4) {
			dns4.sin_family = AF_INET;
			dns4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
			memcpy(&dns4.sin_port, reply, 2);
			dns6.sin6_family = AF_INET6;
			dns6.sin6_addr = in6addr_loopback;
			memcpy(&dns6.sin6_port, reply + 2, 2);
			mode = PROXY;
		}
	}
	pthread_mutex_unlock(&lock);
	return mode == PROXY;
}

__attribute__((constructor)) static void start(void)
{
	const char *path = getenv("QEMUBOX_EGRESS"), *list = getenv("QEMUBOX_EGRESS_REFUSE");
	real_connect = dlsym(RTLD_NEXT, "connect");
	real_sendto = dlsym(RTLD_NEXT, "sendto");
	real_sendmsg = dlsym(RTLD_NEXT, "sendmsg");
	real_recvfrom = dlsym(RTLD_NEXT, "recvfrom");
	if (path && *path) {
		asked = calloc(MAX_FDS, sizeof(*asked));
		join(path);
	} else if (list && *list) {
		parse_refused(list);
		mode = REFUSE_LIST;
	}
}

static int inet(const struct sockaddr *sa)
{
	return sa && (sa->sa_family == AF_INET || sa->sa_family == AF_INET6);
}

static int sock_type(int fd)
{
	int type = 0;
	socklen_t len = sizeof(type);
	getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len);
	return type;
}

static int sock_protocol(int fd)
{
	int proto = 0;
	socklen_t len = sizeof(proto);
	getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len);
	return proto;
}

static const void *addr_bytes(const struct sockaddr *sa, uint16_t *port)
{
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const void *)sa;
		*port = ntohs(in->sin_port);
		return &in->sin_addr;
	}
	const struct sockaddr_in6 *in6 = (const void *)sa;
	*port = ntohs(in6->sin6_port);
	return &in6->sin6_addr;
}

static int is_refused(const struct sockaddr *sa)
{
	uint16_t port;
	const void *bytes = addr_bytes(sa, &port);
	for (int i = 0; i < nrefused; i++)
		if (refused[i].family == sa->sa_family &&
		    !memcmp(refused[i].addr, bytes, sa->sa_family == AF_INET ? 4 : 16))
			return 1;
	return 0;
}

/* The proxy's message: kind, family, port, address (16 bytes); with the socket's end. */
static int tell(int kind, const struct sockaddr *sa, int fd)
{
	unsigned char msg[20] = {kind, sa->sa_family == AF_INET ? 4 : 6};
	uint16_t port;
	const void *bytes = addr_bytes(sa, &port);
	msg[2] = port >> 8;
	msg[3] = port & 0xff;
	memcpy(msg + 4, bytes, sa->sa_family == AF_INET ? 4 : 16);
	struct iovec iov = {msg, sizeof(msg)};
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} u;
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	if (fd >= 0) {
		memset(&u, 0, sizeof(u));
		mh.msg_control = u.buf;
		mh.msg_controllen = sizeof(u.buf);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	pthread_mutex_lock(&lock);
	ssize_t n = control < 0 ? -1 : real_sendmsg(control, &mh, MSG_NOSIGNAL);
	pthread_mutex_unlock(&lock);
	return n == sizeof(msg) ? 0 : -1;
}

static int proxied_connect(int fd, const struct sockaddr *sa)
{
	int pair[2], flags = fcntl(fd, F_GETFL), fdflags = fcntl(fd, F_GETFD);
	unsigned char verdict = 0;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
		return -1;
	if (tell(MSG_CONNECT, sa, pair[1]) < 0) {
		close(pair[0]);
		close(pair[1]);
		errno = ECONNREFUSED;
		return -1;
	}
	close(pair[1]);
	struct pollfd p = {pair[0], POLLIN, 0};
	if (poll(&p, 1, VERDICT_MS) != 1 || read(pair[0], &verdict, 1) != 1 || verdict != 1) {
		close(pair[0]);
		errno = ECONNREFUSED;
		return -1;
	}
	if (dup3(pair[0], fd, (fdflags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
		close(pair[0]);
		return -1;
	}
	close(pair[0]);
	fcntl(fd, F_SETFL, flags);
	return 0;
}

int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
	if (!real_connect)
		real_connect = dlsym(RTLD_NEXT, "connect");
	if (mode == PASS || !inet(sa))
		return real_connect(fd, sa, len);
	if (mode == REFUSE_LIST) {
		if (is_refused(sa)) {
			errno = ECONNREFUSED;
			return -1;
		}
		return real_connect(fd, sa, len);
	}
	if (greeted() && sock_type(fd) == SOCK_STREAM)
		return proxied_connect(fd, sa);
	errno = mode == CLOSED ? ENETUNREACH : EACCES;
	return -1;
}

/* Where a datagram to ``sa`` goes instead: the proxy's resolver, or nowhere (NULL). */
static const struct sockaddr *datagram_target(int fd, const struct sockaddr *sa, socklen_t *len)
{
	uint16_t port;
	addr_bytes(sa, &port);
	if (mode == PROXY && port == 53 && sock_type(fd) == SOCK_DGRAM &&
	    sock_protocol(fd) == IPPROTO_UDP) {
		if (fd >= 0 && fd < MAX_FDS)
			memcpy(&asked[fd], sa, sa->sa_family == AF_INET ? sizeof(struct sockaddr_in)
								      : sizeof(struct sockaddr_in6));
		if (sa->sa_family == AF_INET) {
			*len = sizeof(dns4);
			return (const void *)&dns4;
		}
		*len = sizeof(dns6);
		return (const void *)&dns6;
	}
	if (mode == PROXY)
		tell(MSG_DATAGRAM, sa, -1);
	return NULL;
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa,
	       socklen_t len)
{
	if (!real_sendto)
		real_sendto = dlsym(RTLD_NEXT, "sendto");
	if (mode == PASS || !inet(sa))
		return real_sendto(fd, buf, n, flags, sa, len);
	if (mode == REFUSE_LIST) {
		if (is_refused(sa)) {
			errno = EACCES;
			return -1;
		}
		return real_sendto(fd, buf, n, flags, sa, len);
	}
	const struct sockaddr *to = greeted() ? datagram_target(fd, sa, &len) : NULL;
	if (!to) {
		errno = EACCES;
		return -1;
	}
	return real_sendto(fd, buf, n, flags, to, len);
}

ssize_t sendmsg(int fd, const struct msghdr *mh, int flags)
{
	if (!real_sendmsg)
		real_sendmsg = dlsym(RTLD_NEXT, "sendmsg");
	const struct sockaddr *sa = mh->msg_name;
	if (mode == PASS || !mh->msg_namelen || !inet(sa))
		return real_sendmsg(fd, mh, flags);
	if (mode == REFUSE_LIST) {
		if (is_refused(sa)) {
			errno = EACCES;
			return -1;
		}
		return real_sendmsg(fd, mh, flags);
	}
	socklen_t len = mh->msg_namelen;
	const struct sockaddr *to = greeted() ? datagram_target(fd, sa, &len) : NULL;
	if (!to) {
		errno = EACCES;
		return -1;
	}
	struct msghdr copy = *mh;
	copy.msg_name = (void *)to;
	copy.msg_namelen = len;
	return real_sendmsg(fd, &copy, flags);
}

/* An answer from the proxy's resolver comes from the server the guest asked. */
ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *sa, socklen_t *len)
{
	if (!real_recvfrom)
		real_recvfrom = dlsym(RTLD_NEXT, "recvfrom");
	ssize_t r = real_recvfrom(fd, buf, n, flags, sa, len);
	if (r < 0 || mode != PROXY || !sa || !len || fd < 0 || fd >= MAX_FDS ||
	    !asked[fd].ss_family)
		return r;
	int ours = (sa->sa_family == AF_INET &&
		    ((struct sockaddr_in *)sa)->sin_port == dns4.sin_port &&
		    ((struct sockaddr_in *)sa)->sin_addr.s_addr == dns4.sin_addr.s_addr) ||
		   (sa->sa_family == AF_INET6 &&
		    ((struct sockaddr_in6 *)sa)->sin6_port == dns6.sin6_port &&
		    !memcmp(&((struct sockaddr_in6 *)sa)->sin6_addr, &in6addr_loopback, 16));
	if (ours) {
		socklen_t size = asked[fd].ss_family == AF_INET ? sizeof(struct sockaddr_in)
								 : sizeof(struct sockaddr_in6);
		memcpy(sa, &asked[fd], *len < size ? *len : size);
		*len = size;
	}
	return r;
}
