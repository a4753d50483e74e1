/*
 * qemubox guest agent: the sandbox guest's /init.
 *
 * As PID 1 it mounts the kernel file systems, loads the modules listed in
 * /etc/qemubox/modules, brings up the loopback interface, switches to the root the kernel
 * command line names ("qemubox.root=disk:SERIAL", or "virtiofs:TAG" / "9p:TAG" for a
 * read-only host directory under a tmpfs overlay; by default the initramfs stays the root),
 * keeping its busybox at /run/qemubox/busybox, then serves the host over the
 * virtio-serial ports named "qemubox.agent.K-of-N" (N client slots, each a client of its
 * own, served side by side): it runs commands (argv, env, cwd, stdin),
 * streams their stdout and stderr separately, reports exit status or signal, signals
 * process groups, mounts file systems, and powers off. It reaps every orphan.
 *
 * The wire format is qemubox/guest/protocol.py's, which documents it; the constants below
 * mirror it (a test compares them). In short: frames of u8 type, u32 id, u32 payload length
 * and the payload, little-endian; zero bytes between frames are padding. A client begins
 * with HELLO(nonce) and gets READY(nonce, version, release). When the host side of a
 * port closes, or a new client says HELLO on it, the commands of the port's previous client
 * are killed: nobody is left to read their output; but a command started as kept runs on,
 * listed by KEPT, until a client ATTACHes to it (or it ends).
 *
 * Writes to the host never block: each port has an output queue, flushed as the port takes
 * it; a command's output is read only while its port's queue is short, so a slow (or
 * stopped) client holds back its own commands and nobody else's.
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64 /* 32-bit guests: sizes and inode numbers past 2^31 */
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/random.h>
#include <sys/fsuid.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

enum {
	FR_HELLO = 1, FR_EXEC = 2, FR_STDIN = 3, FR_SIGNAL = 4, FR_MOUNT = 5, FR_PING = 6,
	FR_POWEROFF = 7, FR_BYE = 8, FR_RESIZE = 9, FR_RENEW = 10, FR_FS = 11, FR_KEPT = 12,
	FR_ATTACH = 13, FR_WATCH = 14, FR_UNWATCH = 15,
	FR_READY = 20, FR_STDOUT = 21, FR_STDERR = 22, FR_EXIT = 23, FR_ERROR = 24, FR_OK = 25,
	FR_PONG = 26, FR_STDIN_ACK = 27, FR_ENTRIES = 28, FR_STARTED = 29, FR_COMMAND = 30,
	FR_EVENT = 31,
};

/* EVENT kinds */
enum { EV_CREATE = 1, EV_WRITE = 2, EV_REMOVE = 3, EV_RENAME = 4, EV_CHMOD = 5 };
/* WATCH flag: the directories under the path too, those made later included */
#define WATCH_RECURSIVE 1
#define MAX_WATCHES 32

/* FS operations */
enum { FS_STAT = 1, FS_LIST = 2, FS_MKDIR = 3, FS_MOVE = 4, FS_REMOVE = 5 };
/* FS flag: uid, gid and the supplementary groups follow */
#define FS_USER 1
#define MAX_DEPTH 64
#define MAX_ENTRIES 100000
/* bytes of ENTRIES payloads one request gets */
#define MAX_LISTING (65536 * 1024)

#define VERSION 4
#define HEADER 9
#define MAX_PAYLOAD (256 * 1024)
#define CHUNK (64 * 1024)
#define NONCE_SIZE 16
#define STDIN_WINDOW (1024 * 1024)
#define EXEC_STDIN 1
#define EXEC_TTY 2
/* EXEC flag: uid, gid and the supplementary groups follow */
#define EXEC_USER 4
#define MAX_GROUPS 64
/* EXEC flag: the command outlives its client (a note, the host's description, follows) */
#define EXEC_KEEP 8
#define MAX_NOTE (64 * 1024)
#define MAX_EXECS 64
#define MAX_PORTS 16
#define QUEUE_HIGH (256 * 1024) /* a port's queue above this: its commands' output waits */
#define DRAIN_GRACE_MS 100

struct port {
	int fd;
	int connected;          /* a host client is on the other end of the port */
	int lost;               /* it went away: end its commands at the next safe point */
	unsigned char *rbuf;    /* what the client sent, not yet a whole frame */
	size_t rlen, rcap;
	unsigned char *out;     /* frames for the client, not yet taken by the port */
	size_t olen, ocap;
};

struct exec {
	int used;
	struct port *port;      /* the client's */
	uint32_t id;
	pid_t pid;
	int out, err, in;       /* our ends; -1 when closed (a terminal's: out and in) */
	int tty;                /* out is a pseudo-terminal's master */
	int exited, status;
	long long exited_at;    /* ms, when the process ended */
	char *inbuf;            /* stdin received, not yet taken by the command */
	size_t inlen;
	int in_eof;             /* host closed stdin: close after the buffer drains */
	char *note;             /* a kept command's (it outlives its client): the host's words */
	uint32_t note_len;
};

/* A directory watch: an inotify instance of its own (two watches of one directory must not
 * share a watch descriptor), the path of each directory it watches by descriptor. */
struct watch {
	int used;
	struct port *port;
	uint32_t id;
	int fd;
	int recursive;
	char **dirs; /* by watch descriptor */
	int ndirs;
};

static struct watch watches[MAX_WATCHES];

/* Where a kept command's frames go while no client has it: nowhere (queue() drops them). */
static struct port nobody = { .fd = -1 };

static struct exec execs[MAX_EXECS];
static struct port ports[MAX_PORTS];
static int nports;

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static void die(const char *what)
{
	fprintf(stderr, "qemubox-agent: %s: %s\n", what, strerror(errno));
	sync();
	reboot(RB_POWER_OFF);
	_exit(1);
}

/* Queue bytes for the port's client (dropped when there is none: a later client
 * resynchronises on its own). */
static void queue(struct port *p, const void *buf, size_t len)
{
	if (!p->connected)
		return;
	if (p->olen + len > p->ocap) {
		size_t cap = p->ocap ? p->ocap : 65536;
		while (cap < p->olen + len)
			cap *= 2;
		p->out = realloc(p->out, cap);
		if (!p->out)
			die("queue");
		p->ocap = cap;
	}
	memcpy(p->out + p->olen, buf, len);
	p->olen += len;
}

/* Hand the port what it takes now. */
static void flush_port(struct port *p)
{
	size_t done = 0;
	while (done < p->olen) {
		ssize_t n = write(p->fd, p->out + done, p->olen - done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN) {
				p->connected = 0;
				p->lost = 1;
				p->olen = done = 0;
			}
			break;
		}
		done += n;
	}
	memmove(p->out, p->out + done, p->olen - done);
	p->olen -= done;
}

/* Every number on the wire is little-endian, whatever the guest's byte order (s390x). */
static void put_le32(unsigned char *at, uint32_t v)
{
	v = htole32(v);
	memcpy(at, &v, 4);
}

static uint32_t le32_at(const unsigned char *at)
{
	uint32_t v;
	memcpy(&v, at, 4);
	return le32toh(v);
}

static void send_frame(struct port *p, uint8_t type, uint32_t id, const void *payload,
		       uint32_t len)
{
	unsigned char head[HEADER];
	head[0] = type;
	put_le32(head + 1, id);
	put_le32(head + 5, len);
	queue(p, head, HEADER);
	if (len)
		queue(p, payload, len);
	flush_port(p);
}

static void send_error(struct port *p, uint32_t id, int err, const char *message)
{
	char buf[1024];
	size_t n = strlen(message);
	if (n > sizeof(buf) - 4)
		n = sizeof(buf) - 4;
	put_le32((unsigned char *)buf, (uint32_t)err);
	memcpy(buf + 4, message, n);
	send_frame(p, FR_ERROR, id, buf, 4 + n);
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* The slot is free again (the process, if any, is reap()'s). */
static void forget(struct exec *e)
{
	free(e->inbuf);
	free(e->note);
	memset(e, 0, sizeof(*e));
	e->out = e->err = e->in = -1;
}

/* Stdin the command has not taken yet: dropped when its client changes, whose window it
 * was (the new client must not be acknowledged bytes it never sent). */
static void drop_stdin(struct exec *e)
{
	free(e->inbuf);
	e->inbuf = NULL;
	e->inlen = 0;
	if (e->in_eof)
		close_fd(&e->in);
}

/* The client that started these commands is gone: kill them, forget them (reap() still
 * collects the processes); kept ones go on with nobody's port until a client attaches
 * (their output is read and dropped meanwhile; when they end they are forgotten). */
static void end_watch(struct watch *w);

static void end_all_commands(struct port *p)
{
	for (int i = 0; i < MAX_WATCHES; i++)
		if (watches[i].used && watches[i].port == p)
			end_watch(&watches[i]);
	for (int i = 0; i < MAX_EXECS; i++) {
		struct exec *e = &execs[i];
		if (!e->used || e->port != p)
			continue;
		if (e->note) {
			e->port = &nobody;
			e->id = 0;
			drop_stdin(e);
			continue;
		}
		if (!e->exited)
			kill(-e->pid, SIGKILL);
		close_fd(&e->out);
		close_fd(&e->err);
		close_fd(&e->in);
		forget(e);
	}
}

/* --- reading frames from the host ------------------------------------------------------ */

struct reader {
	const unsigned char *p, *end;
	int bad;
};

static uint32_t get_u32(struct reader *r)
{
	uint32_t v = 0;
	if (r->end - r->p < 4) {
		r->bad = 1;
		return 0;
	}
	v = le32_at(r->p);
	r->p += 4;
	return v;
}

/* A string from the frame, NUL-terminated in a fresh allocation; its length in *len. */
static char *get_bytes(struct reader *r, uint32_t *len)
{
	uint32_t n = get_u32(r);
	char *s;
	if (r->bad || (size_t)(r->end - r->p) < n) {
		r->bad = 1;
		return NULL;
	}
	s = malloc(n + 1);
	memcpy(s, r->p, n);
	s[n] = 0;
	r->p += n;
	*len = n;
	return s;
}

static char *get_str(struct reader *r)
{
	uint32_t n;
	return get_bytes(r, &n);
}

/* A user as the host names one: uid, gid, the supplementary groups. */
struct ids {
	uint32_t uid, gid, ngroups;
	gid_t groups[MAX_GROUPS];
};

static void get_ids(struct reader *r, struct ids *who)
{
	who->uid = get_u32(r);
	who->gid = get_u32(r);
	who->ngroups = get_u32(r);
	for (uint32_t i = 0; i < who->ngroups && i < MAX_GROUPS; i++)
		who->groups[i] = get_u32(r);
}

static int bad_ids(const struct ids *who)
{
	return who->ngroups > MAX_GROUPS || who->uid == (uint32_t)-1 || who->gid == (uint32_t)-1;
}

static struct exec *find_exec(struct port *p, uint32_t id)
{
	for (int i = 0; i < MAX_EXECS; i++)
		if (execs[i].used && execs[i].port == p && execs[i].id == id)
			return &execs[i];
	return NULL;
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* A pseudo-terminal of rows x cols: its master (ours), and its slave's path in name. */
static int open_tty(uint32_t rows, uint32_t cols, char *name, size_t len)
{
	struct winsize ws = { .ws_row = rows, .ws_col = cols };
	int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (master < 0)
		return -1;
	if (grantpt(master) || unlockpt(master) || ptsname_r(master, name, len) ||
	    ioctl(master, TIOCSWINSZ, &ws)) {
		close(master);
		return -1;
	}
	return master;
}

static void do_exec(struct port *port, uint32_t id, struct reader *r)
{
	uint32_t flags = get_u32(r), argc = get_u32(r), envc = 0, rows = 0, cols = 0;
	char **argv = NULL, **envp = NULL;
	char *cwd = NULL, *note = NULL;
	uint32_t note_len = 0;
	char tty_name[128] = "";
	int out[2] = { -1, -1 }, err[2] = { -1, -1 }, in[2] = { -1, -1 }, report[2] = { -1, -1 };
	int tty = flags & EXEC_TTY, master = -1;
	struct ids who = { 0 };
	struct exec *e = NULL;
	pid_t pid;

	if (r->bad || argc == 0 || argc > 65536) {
		send_error(port, id, EINVAL, "bad exec request");
		return;
	}
	argv = calloc(argc + 1, sizeof(char *));
	for (uint32_t i = 0; i < argc; i++)
		argv[i] = get_str(r);
	envc = get_u32(r);
	if (r->bad || envc > 65536) {
		envc = 0;
		send_error(port, id, EINVAL, "bad exec request");
		goto done;
	}
	envp = calloc(envc + 1, sizeof(char *));
	for (uint32_t i = 0; i < envc; i++)
		envp[i] = get_str(r);
	cwd = get_str(r);
	if (tty) {
		rows = get_u32(r);
		cols = get_u32(r);
	}
	if (flags & EXEC_USER)
		get_ids(r, &who);
	if (flags & EXEC_KEEP)
		note = get_bytes(r, &note_len);
	if (r->bad || (tty && (!rows || !cols || rows > 65535 || cols > 65535)) || bad_ids(&who) ||
	    note_len > MAX_NOTE) {
		send_error(port, id, EINVAL, "bad exec request");
		goto done;
	}
	for (int i = 0; i < MAX_EXECS; i++)
		if (!execs[i].used) {
			e = &execs[i];
			break;
		}
	if (!e) {
		send_error(port, id, EAGAIN, "too many commands running at once");
		goto done;
	}
	if (tty && (master = open_tty(rows, cols, tty_name, sizeof(tty_name))) < 0) {
		send_error(port, id, errno, "cannot open a pseudo-terminal");
		goto done;
	}
	if ((!tty && (pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC))) ||
	    pipe2(report, O_CLOEXEC) || (!tty && (flags & EXEC_STDIN) && pipe2(in, O_CLOEXEC))) {
		send_error(port, id, errno, "pipe");
		goto fail;
	}
	pid = fork();
	if (pid < 0) {
		send_error(port, id, errno, "fork");
		goto fail;
	}
	if (pid == 0) {
		unsigned char note[1 + sizeof(int)];
		int saved;
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		setsid();
		note[0] = 't';
		if (tty) {
			/* the session's controlling terminal: ^C at it signals the foreground job */
			int slave = open(tty_name, O_RDWR);
			if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0)
				goto report;
			dup2(slave, 0);
			dup2(slave, 1);
			dup2(slave, 2);
			if (slave > 2)
				close(slave);
		} else {
			if (flags & EXEC_STDIN)
				dup2(in[0], 0);
			else
				dup2(open("/dev/null", O_RDONLY), 0);
			dup2(out[1], 1);
			dup2(err[1], 2);
		}
		note[0] = 'u';
		if ((flags & EXEC_USER) &&
		    (setgroups(who.ngroups, who.groups) < 0 || setgid(who.gid) < 0 ||
		     setuid(who.uid) < 0))
			goto report;
		note[0] = 'c';
		/* execvpe searches our own PATH: the command's PATH, when given, is the one. */
		for (uint32_t i = 0; i < envc; i++)
			if (!strncmp(envp[i], "PATH=", 5))
				setenv("PATH", envp[i] + 5, 1);
		if (chdir(cwd) == 0) {
			execvpe(argv[0], argv, envp);
			note[0] = 'x';
		}
report:
		saved = errno;
		memcpy(note + 1, &saved, sizeof(saved));
		write(report[1], note, sizeof(note));
		_exit(127);
	}
	close_fd(&out[1]);
	close_fd(&err[1]);
	close_fd(&report[1]);
	close_fd(&in[0]);
	{
		unsigned char note[1 + sizeof(int)];
		ssize_t n;
		do
			n = read(report[0], note, sizeof(note));
		while (n < 0 && errno == EINTR);
		close_fd(&report[0]);
		if (n == (ssize_t)sizeof(note)) {
			int saved, status;
			char msg[1024];
			memcpy(&saved, note + 1, sizeof(saved));
			waitpid(pid, &status, 0);
			if (note[0] == 't')
				snprintf(msg, sizeof(msg), "cannot open terminal %s: %s", tty_name,
					 strerror(saved));
			else if (note[0] == 'u')
				snprintf(msg, sizeof(msg), "cannot become user %u (group %u): %s",
					 who.uid, who.gid, strerror(saved));
			else
				snprintf(msg, sizeof(msg), "%s %s: %s",
					 note[0] == 'c' ? "cannot change directory to" : "cannot run",
					 note[0] == 'c' ? cwd : argv[0], strerror(saved));
			send_error(port, id, saved, msg);
			goto fail;
		}
	}
	e->used = 1;
	e->port = port;
	e->id = id;
	e->pid = pid;
	e->tty = tty;
	e->out = tty ? master : out[0];
	e->err = tty ? -1 : err[0];
	e->in = tty ? fcntl(master, F_DUPFD_CLOEXEC, 0) : ((flags & EXEC_STDIN) ? in[1] : -1);
	e->exited = 0;
	e->exited_at = 0;
	e->inbuf = NULL;
	e->inlen = 0;
	e->in_eof = 0;
	e->note = note; /* kept: NUL-terminated, its length apart */
	e->note_len = note_len;
	note = NULL;
	set_nonblock(e->out);
	if (e->err >= 0)
		set_nonblock(e->err);
	if (e->in >= 0)
		set_nonblock(e->in);
	{
		unsigned char started[4];
		put_le32(started, (uint32_t)pid);
		send_frame(port, FR_STARTED, id, started, 4);
	}
	goto done;
fail:
	close_fd(&master);
	for (int i = 0; i < 2; i++) {
		close_fd(&out[i]);
		close_fd(&err[i]);
		close_fd(&in[i]);
		close_fd(&report[i]);
	}
done:
	for (uint32_t i = 0; i < argc; i++)
		free(argv[i]);
	for (uint32_t i = 0; i < envc; i++)
		free(envp[i]);
	free(argv);
	free(envp);
	free(cwd);
	free(note);
}

/* --- file operations ------------------------------------------------------------------- */

/* dir/name into out (dir itself when name is empty; no doubled slash under "/"): 0, or -1
 * when it does not fit. */
static int join_path(char *out, size_t size, const char *dir, const char *name)
{
	int n = snprintf(out, size, "%s%s%s", dir, *name && strcmp(dir, "/") ? "/" : "", name);
	return n < 0 || (size_t)n >= size ? -1 : n;
}

/* ENTRIES frames under construction: u32 count, then per entry the path, u32 mode, uid and
 * gid, u64 size, u64 mtime (ns since the epoch) and the symlink's target (empty otherwise). */
struct entries {
	struct port *port;
	uint32_t id;
	unsigned char buf[MAX_PAYLOAD];
	size_t len, bytes;
	uint32_t count, total;
};

static void put_le64(unsigned char *at, uint64_t v)
{
	v = htole64(v);
	memcpy(at, &v, 8);
}

static void flush_entries(struct entries *en)
{
	put_le32(en->buf, en->count);
	send_frame(en->port, FR_ENTRIES, en->id, en->buf, en->len);
	en->bytes += en->len;
	en->len = 4;
	en->count = 0;
}

/* Add path's entry (lstat: a symlink is itself, with its target); errno when it fails. */
static int add_entry(struct entries *en, const char *path, const struct stat *st)
{
	char target[4096] = "";
	size_t plen = strlen(path), tlen = 0;
	struct stat own;
	if (!st) {
		if (lstat(path, &own) < 0)
			return errno;
		st = &own;
	}
	if (S_ISLNK(st->st_mode)) {
		ssize_t n = readlink(path, target, sizeof(target) - 1);
		tlen = n > 0 ? (size_t)n : 0;
	}
	if (plen > 4096)
		return ENAMETOOLONG;
	if (en->bytes + en->len + 36 + plen + tlen > MAX_LISTING)
		return E2BIG;
	if (en->len + 4 + plen + 4 * 3 + 8 * 2 + 4 + tlen > MAX_PAYLOAD)
		flush_entries(en);
	put_le32(en->buf + en->len, plen);
	memcpy(en->buf + en->len + 4, path, plen);
	en->len += 4 + plen;
	put_le32(en->buf + en->len, st->st_mode);
	put_le32(en->buf + en->len + 4, st->st_uid);
	put_le32(en->buf + en->len + 8, st->st_gid);
	put_le64(en->buf + en->len + 12, (uint64_t)st->st_size);
	put_le64(en->buf + en->len + 20,
		 (uint64_t)st->st_mtim.tv_sec * 1000000000ULL + (uint64_t)st->st_mtim.tv_nsec);
	put_le32(en->buf + en->len + 28, tlen);
	memcpy(en->buf + en->len + 32, target, tlen);
	en->len += 32 + tlen;
	en->count++;
	en->total++;
	return 0;
}

/* The entries under dir, down to depth levels (symlinks are not followed). */
static int list_dir(struct entries *en, const char *dir, uint32_t depth)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	int err = 0;
	if (!d)
		return errno;
	while (!err && (de = readdir(d))) {
		char path[4096];
		struct stat st;
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (join_path(path, sizeof(path), dir, de->d_name) < 0) {
			err = ENAMETOOLONG;
			break;
		}
		if (lstat(path, &st) < 0)
			continue; /* gone meanwhile */
		if (en->total >= MAX_ENTRIES) {
			err = E2BIG;
			break;
		}
		err = add_entry(en, path, &st);
		if (!err && depth > 1 && S_ISDIR(st.st_mode)) {
			err = list_dir(en, path, depth - 1);
			if (err == EACCES || err == ENOENT)
				err = 0; /* a directory it may not read, or gone: listed, not entered */
		}
	}
	closedir(d);
	return err;
}

/* mkdir -p; errno of the first failure, EEXIST only for path itself. */
static int make_dirs(const char *path, int parents_only)
{
	char buf[4096];
	if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
		return ENAMETOOLONG;
	for (char *p = buf + 1; *p; p++)
		if (*p == '/') {
			*p = 0;
			if (mkdir(buf, 0755) < 0 && errno != EEXIST)
				return errno;
			*p = '/';
		}
	if (!parents_only && mkdir(buf, 0755) < 0)
		return errno;
	return 0;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)ftw;
	if ((flag == FTW_DP ? rmdir(path) : unlink(path)) < 0 && errno != ENOENT)
		return errno;
	return 0;
}

/* A file operation as the user the host names (its file system ids and groups), the
 * answer ENTRIES (then OK) or ERROR. Paths are absolute. */
static void do_fs(struct port *port, uint32_t id, struct reader *r)
{
	static struct entries en;
	uint32_t op = get_u32(r), flags = get_u32(r), depth = get_u32(r);
	char *path = get_str(r), *to = get_str(r);
	struct ids who = { 0 };
	char msg[1024];
	int err = 0;
	if (flags & FS_USER)
		get_ids(r, &who);
	if (r->bad || r->p != r->end || !path || !to || path[0] != '/' ||
	    (op == FS_MOVE && to[0] != '/') || op < FS_STAT || op > FS_REMOVE ||
	    (op == FS_LIST && (depth < 1 || depth > MAX_DEPTH)) || bad_ids(&who)) {
		send_error(port, id, EINVAL, "bad file request");
		goto done;
	}
	if (flags & FS_USER) {
		if (setgroups(who.ngroups, who.groups) < 0) {
			send_error(port, id, errno, "setgroups");
			goto done;
		}
		setfsgid(who.gid);
		setfsuid(who.uid);
	}
	en.port = port;
	en.id = id;
	en.len = 4;
	en.count = en.total = 0;
	en.bytes = 0;
	switch (op) {
	case FS_STAT:
		err = add_entry(&en, path, NULL);
		break;
	case FS_LIST: {
		struct stat st;
		if (stat(path, &st) < 0)
			err = errno;
		else if (!S_ISDIR(st.st_mode))
			err = ENOTDIR;
		else
			err = list_dir(&en, path, depth);
		break;
	}
	case FS_MKDIR:
		err = make_dirs(path, 0);
		if (!err)
			err = add_entry(&en, path, NULL);
		break;
	case FS_MOVE:
		err = make_dirs(to, 1);
		if (!err && rename(path, to) < 0)
			err = errno;
		if (!err)
			err = add_entry(&en, to, NULL);
		break;
	case FS_REMOVE: {
		struct stat st;
		if (lstat(path, &st) < 0)
			err = errno;
		else if (!strcmp(path, "/"))
			err = EBUSY;
		else {
			int rc = nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS);
			err = rc > 0 ? rc : rc < 0 ? errno : 0;
		}
		break;
	}
	}
	if (flags & FS_USER) {
		setfsuid(0);
		setfsgid(0);
		setgroups(0, NULL);
	}
	if (err) {
		if (err == E2BIG)
			snprintf(msg, sizeof(msg), "%s: more than %d entries (or %d MiB of them)",
				 path, MAX_ENTRIES, MAX_LISTING >> 20);
		else
			snprintf(msg, sizeof(msg), "%s: %s", op == FS_MOVE && err != ENOENT ? to : path,
				 strerror(err));
		send_error(port, id, err, msg);
		goto done;
	}
	if (en.count)
		flush_entries(&en);
	send_frame(port, FR_OK, id, NULL, 0);
done:
	free(path);
	free(to);
}

/* A COMMAND frame for each kept command (u32 pid, u32 flags: 1 a client has it, 2 it runs
 * on a terminal; its note), then OK. */
static void list_kept(struct port *port, uint32_t id)
{
	static unsigned char buf[8 + 4 + MAX_NOTE];
	for (int i = 0; i < MAX_EXECS; i++) {
		struct exec *e = &execs[i];
		if (!e->used || !e->note || e->exited)
			continue;
		put_le32(buf, (uint32_t)e->pid);
		put_le32(buf + 4, (e->port != &nobody ? 1 : 0) | (e->tty ? 2 : 0));
		put_le32(buf + 8, e->note_len);
		memcpy(buf + 12, e->note, e->note_len);
		send_frame(port, FR_COMMAND, id, buf, 12 + e->note_len);
	}
	send_frame(port, FR_OK, id, NULL, 0);
}

/* This request takes over the kept command with the pid: STARTED, then its output from now
 * on and its end. A client that had it is told by an ERROR. */
static void attach_kept(struct port *port, uint32_t id, struct reader *r)
{
	uint32_t pid = get_u32(r);
	char msg[128];
	struct exec *e = NULL;
	unsigned char started[4];
	for (int i = 0; i < MAX_EXECS && !r->bad; i++)
		if (execs[i].used && execs[i].note && (uint32_t)execs[i].pid == pid)
			e = &execs[i];
	if (!e || r->bad || r->p != r->end) {
		snprintf(msg, sizeof(msg), "no kept command has pid %u", pid);
		send_error(port, id, ESRCH, msg);
		return;
	}
	if (e->port != &nobody && (e->port != port || e->id != id))
		send_error(e->port, e->id, EBUSY, "another client took the command over");
	e->port = port;
	e->id = id;
	drop_stdin(e);
	put_le32(started, pid);
	send_frame(port, FR_STARTED, id, started, 4);
}

/* --- directory watches ----------------------------------------------------------------- */

#define WATCH_MASK                                                                             \
	(IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_DELETE | IN_MOVED_FROM | IN_ATTRIB |         \
	 IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)

static void end_watch(struct watch *w)
{
	close_fd(&w->fd);
	for (int i = 0; i < w->ndirs; i++)
		free(w->dirs[i]);
	free(w->dirs);
	memset(w, 0, sizeof(*w));
	w->fd = -1;
}

static void send_event(struct watch *w, uint32_t kind, const char *dir, const char *name);

/* Watch dir (and, for a recursive watch, the directories under it); errno on failure. A
 * directory made under a watched one (announce) may have been filled before it was
 * watched: what it holds is announced as made. */
static int watch_dir(struct watch *w, const char *dir, int top, int announce)
{
	int wd = inotify_add_watch(w->fd, dir, WATCH_MASK);
	if (wd < 0)
		return top || errno == ENOSPC ? errno : 0; /* a subdirectory gone meanwhile: fine */
	if (wd >= w->ndirs) {
		int n = wd + 16;
		char **more = realloc(w->dirs, n * sizeof(char *));
		if (!more)
			return ENOMEM;
		memset(more + w->ndirs, 0, (n - w->ndirs) * sizeof(char *));
		w->dirs = more;
		w->ndirs = n;
	}
	free(w->dirs[wd]);
	w->dirs[wd] = strdup(dir);
	if (w->recursive) {
		DIR *d = opendir(dir);
		struct dirent *de;
		int err = 0;
		while (d && !err && (de = readdir(d))) {
			char path[4096];
			if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
				continue;
			if (announce)
				send_event(w, EV_CREATE, dir, de->d_name);
			if (de->d_type != DT_DIR)
				continue;
			if (join_path(path, sizeof(path), dir, de->d_name) >= 0)
				err = watch_dir(w, path, 0, announce);
		}
		if (d)
			closedir(d);
		return err;
	}
	return 0;
}

/* Start watching: STARTED (u32: how many directories), then EVENT frames under this id
 * (u32 kind, the path) until UNWATCH (then OK), the watched directory going (OK), or an
 * error (ERROR: EOVERFLOW when events were lost). */
static void do_watch(struct port *port, uint32_t id, struct reader *r)
{
	uint32_t flags = get_u32(r);
	char *path = get_str(r), msg[1024];
	struct watch *w = NULL;
	int err;
	if (r->bad || r->p != r->end || !path || path[0] != '/') {
		send_error(port, id, EINVAL, "bad watch request");
		goto done;
	}
	for (int i = 0; i < MAX_WATCHES; i++)
		if (!watches[i].used) {
			w = &watches[i];
			break;
		}
	if (!w) {
		send_error(port, id, EAGAIN, "too many directories watched at once");
		goto done;
	}
	w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (w->fd < 0) {
		send_error(port, id, errno, "inotify");
		w->fd = -1;
		goto done;
	}
	w->used = 1;
	w->port = port;
	w->id = id;
	w->recursive = flags & WATCH_RECURSIVE;
	err = watch_dir(w, path, 1, 0);
	if (err) {
		snprintf(msg, sizeof(msg), "%s: %s", path,
			 err == ENOSPC ? "too many directories to watch" : strerror(err));
		send_error(port, id, err, msg);
		end_watch(w);
		goto done;
	}
	{
		unsigned char watching[4];
		uint32_t ndirs = 0;
		for (int i = 0; i < w->ndirs; i++)
			ndirs += w->dirs[i] != NULL;
		put_le32(watching, ndirs);
		send_frame(port, FR_STARTED, id, watching, 4); /* watching: events follow */
	}
done:
	free(path);
}

static void send_event(struct watch *w, uint32_t kind, const char *dir, const char *name)
{
	unsigned char buf[4 + 4 + 4096 + 256];
	int n = join_path((char *)buf + 8, sizeof(buf) - 8, dir, name);
	if (n < 0)
		return;
	put_le32(buf, kind);
	put_le32(buf + 4, n);
	send_frame(w->port, FR_EVENT, w->id, buf, 8 + n);
}

/* What the watch's inotify instance has, as EVENT frames. */
static void read_watch(struct watch *w)
{
	char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
	for (;;) {
		ssize_t n = read(w->fd, buf, sizeof(buf));
		if (n <= 0)
			return;
		for (char *at = buf; at < buf + n;) {
			struct inotify_event *ev = (struct inotify_event *)at;
			const char *dir = ev->wd >= 0 && ev->wd < w->ndirs ? w->dirs[ev->wd] : NULL;
			uint32_t m = ev->mask;
			at += sizeof(*ev) + ev->len;
			if (m & IN_Q_OVERFLOW) {
				send_error(w->port, w->id, EOVERFLOW, "events came faster than they were read");
				end_watch(w);
				return;
			}
			if (!dir)
				continue;
			if (m & (IN_DELETE_SELF | IN_MOVE_SELF)) {
				if (ev->wd == 1) { /* the watched directory: its instance's first */
					send_event(w, m & IN_DELETE_SELF ? EV_REMOVE : EV_RENAME, dir, "");
					send_frame(w->port, FR_OK, w->id, NULL, 0);
					end_watch(w);
					return;
				}
				continue; /* a subdirectory's: its parent reports it */
			}
			if (m & (IN_CREATE | IN_MOVED_TO)) {
				send_event(w, EV_CREATE, dir, ev->name);
				if (w->recursive && (m & IN_ISDIR)) {
					char path[4096];
					if (join_path(path, sizeof(path), dir, ev->name) >= 0)
						watch_dir(w, path, 0, 1);
				}
			}
			if (m & IN_MODIFY)
				send_event(w, EV_WRITE, dir, ev->name);
			if (m & IN_DELETE)
				send_event(w, EV_REMOVE, dir, ev->name);
			if (m & IN_MOVED_FROM)
				send_event(w, EV_RENAME, dir, ev->name);
			if (m & IN_ATTRIB)
				send_event(w, EV_CHMOD, dir, ev->name);
			if (m & IN_IGNORED) {
				free(w->dirs[ev->wd]);
				w->dirs[ev->wd] = NULL;
				if (ev->wd == 1) { /* the watched directory's file system went */
					send_frame(w->port, FR_OK, w->id, NULL, 0);
					end_watch(w);
					return;
				}
			}
		}
	}
}

static void do_unwatch(struct port *port, uint32_t id)
{
	for (int i = 0; i < MAX_WATCHES; i++)
		if (watches[i].used && watches[i].port == port && watches[i].id == id) {
			end_watch(&watches[i]);
			send_frame(port, FR_OK, id, NULL, 0);
			return;
		}
	/* it ended already (its end is on its way): nothing to say */
}

static void do_resize(struct port *port, uint32_t id, struct reader *r)
{
	struct exec *e = find_exec(port, id);
	uint32_t rows = get_u32(r), cols = get_u32(r);
	struct winsize ws = { .ws_row = rows, .ws_col = cols };
	/* the kernel tells the terminal's foreground job (SIGWINCH) */
	if (e && e->tty && e->out >= 0 && !r->bad && rows && cols && rows < 65536 && cols < 65536)
		ioctl(e->out, TIOCSWINSZ, &ws);
}

static void close_stdin(struct exec *e)
{
	close_fd(&e->in);
	free(e->inbuf);
	e->inbuf = NULL;
	e->inlen = 0;
}

static void ack_stdin(struct exec *e, uint32_t n)
{
	unsigned char buf[4];
	put_le32(buf, n);
	if (n)
		send_frame(e->port, FR_STDIN_ACK, e->id, buf, 4);
}

/* Hand the command what it will take of its stdin; the host learns how much (it keeps at
 * most STDIN_WINDOW bytes in flight, so this buffer stays bounded). */
static void flush_stdin(struct exec *e)
{
	size_t done = 0;
	while (e->in >= 0 && done < e->inlen) {
		ssize_t n = write(e->in, e->inbuf + done, e->inlen - done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			done = e->inlen; /* EPIPE: the command stopped reading; drop the rest */
			close_fd(&e->in);
			break;
		}
		done += n;
	}
	if (done) {
		memmove(e->inbuf, e->inbuf + done, e->inlen - done);
		e->inlen -= done;
		ack_stdin(e, done);
	}
	if (e->in < 0 || (e->in_eof && !e->inlen))
		close_stdin(e);
}

static void do_stdin(struct port *port, uint32_t id, const unsigned char *data, size_t len)
{
	struct exec *e = find_exec(port, id);
	if (!e)
		return;
	if (e->in < 0) {
		/* nobody reads it any more: take it, so that the host does not wait */
		if (len)
			ack_stdin(e, len);
		return;
	}
	if (!len) {
		e->in_eof = 1;
	} else {
		if (e->inlen + len > STDIN_WINDOW + MAX_PAYLOAD) {
			send_error(port, id, EPROTO, "the host sent stdin past its window");
			return;
		}
		e->inbuf = realloc(e->inbuf, e->inlen + len);
		memcpy(e->inbuf + e->inlen, data, len);
		e->inlen += len;
	}
	flush_stdin(e);
}

static void mkdir_p(const char *path)
{
	char buf[4096];
	snprintf(buf, sizeof(buf), "%s", path);
	for (char *p = buf + 1; *p; p++)
		if (*p == '/') {
			*p = 0;
			mkdir(buf, 0755);
			*p = '/';
		}
	mkdir(buf, 0755);
}

/* "serial:NAME" names the virtio disk whose serial is NAME; its /dev node is made from
 * sysfs when devtmpfs has not made it yet. */
static int find_serial(const char *serial, char *out, size_t outlen)
{
	DIR *d = opendir("/sys/block");
	struct dirent *de;
	if (!d)
		return -1;
	while ((de = readdir(d))) {
		char path[512], value[256] = "";
		FILE *f;
		unsigned major, minor;
		snprintf(path, sizeof(path), "/sys/block/%s/serial", de->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(value, sizeof(value), f))
			value[strcspn(value, "\n")] = 0;
		fclose(f);
		if (strcmp(value, serial))
			continue;
		snprintf(out, outlen, "/dev/%s", de->d_name);
		snprintf(path, sizeof(path), "/sys/block/%s/dev", de->d_name);
		f = fopen(path, "r");
		if (f && fscanf(f, "%u:%u", &major, &minor) == 2 && access(out, F_OK) < 0)
			mknod(out, S_IFBLK | 0600, makedev(major, minor));
		if (f)
			fclose(f);
		closedir(d);
		return 0;
	}
	closedir(d);
	return -1;
}

/* Devices of modules loaded at boot probe in the background: wait for them a little. */
#define DEVICE_WAIT_MS 10000

static int resolve_source(const char *source, char *out, size_t outlen)
{
	long long until = now_ms() + DEVICE_WAIT_MS;
	if (strncmp(source, "serial:", 7)) {
		snprintf(out, outlen, "%s", source);
		return 0;
	}
	while (find_serial(source + 7, out, outlen) < 0) {
		if (now_ms() > until) {
			errno = ENODEV;
			return -1;
		}
		usleep(10000);
	}
	return 0;
}

static void do_mount(struct port *port, uint32_t id, struct reader *r)
{
	char *source = get_str(r), *target = get_str(r), *fstype = get_str(r), *data = get_str(r);
	uint32_t flags = get_u32(r);
	char dev[512], msg[1024];
	if (r->bad) {
		send_error(port, id, EINVAL, "bad mount request");
	} else if (resolve_source(source, dev, sizeof(dev)) < 0) {
		snprintf(msg, sizeof(msg), "mount %s: no such device", source);
		send_error(port, id, errno, msg);
	} else {
		long long until = now_ms() + DEVICE_WAIT_MS;
		int rc;
		mkdir_p(target);
		/* A 9p channel or a block device may still be probing: ENOENT/ENODEV for a while. */
		while ((rc = mount(dev, target, fstype, flags, *data ? data : NULL)) < 0 &&
		       (errno == ENOENT || errno == ENODEV) && now_ms() < until)
			usleep(10000);
		if (rc < 0) {
			snprintf(msg, sizeof(msg), "mount %s on %s (%s): %s", dev, target, fstype,
				 strerror(errno));
			send_error(port, id, errno, msg);
		} else {
			send_frame(port, FR_OK, id, NULL, 0);
		}
	}
	free(source);
	free(target);
	free(fstype);
	free(data);
}

/* QEMU may restore a guest without its pending timer event (7.2 does on some machines): the
 * kernel then waits for an interrupt that never comes, and every sleep with it. A timer due
 * before any other makes the kernel program its clock event device again (with no slack, so
 * that it is due first). */
static void kick_timer(void)
{
	struct timespec ns = {0, 1};
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	nanosleep(&ns, NULL);
	prctl(PR_SET_TIMERSLACK, 0UL, 0, 0, 0); /* back to the default its children inherit */
}

/* A guest restored from a snapshot shares its clock and its RNG's state with every other
 * clone: take the host's time, credit the host's random bytes and reseed the CRNG now. */
#define RENEW_SEED 64
static void renew(struct port *port, uint32_t id, const unsigned char *p, size_t len)
{
	struct {
		int entropy_count;
		int buf_size;
		unsigned char buf[RENEW_SEED];
	} seed;
	uint64_t ns;
	struct timespec ts;
	int fd;
	if (len != 8 + RENEW_SEED) {
		send_error(port, id, EINVAL, "bad renew");
		return;
	}
	memcpy(&ns, p, 8);
	ns = le64toh(ns);
	ts.tv_sec = ns / 1000000000ULL;
	ts.tv_nsec = ns % 1000000000ULL;
	if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
		send_error(port, id, errno, "setting the clock");
		return;
	}
	seed.entropy_count = RENEW_SEED * 8;
	seed.buf_size = RENEW_SEED;
	memcpy(seed.buf, p + 8, RENEW_SEED);
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, RNDADDENTROPY, &seed) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0) {
		send_error(port, id, errno, "reseeding the RNG");
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	kick_timer();
	send_frame(port, FR_OK, id, NULL, 0);
}

static void hello(struct port *port, uint32_t id, const unsigned char *p, size_t len)
{
	unsigned char buf[NONCE_SIZE + 4 + 256];
	size_t n;
	FILE *f;
	if (len != NONCE_SIZE) {
		send_error(port, id, EINVAL, "bad hello");
		return;
	}
	end_all_commands(port); /* an earlier client's */
	memcpy(buf, p, NONCE_SIZE);
	put_le32(buf + NONCE_SIZE, VERSION);
	n = NONCE_SIZE + 4;
	f = fopen("/proc/sys/kernel/osrelease", "r");
	if (f) {
		char release[256] = "";
		if (fgets(release, sizeof(release), f)) {
			release[strcspn(release, "\n")] = 0;
			memcpy(buf + n, release, strlen(release));
			n += strlen(release);
		}
		fclose(f);
	}
	send_frame(port, FR_READY, id, buf, n);
}

static void handle_frame(struct port *port, uint8_t type, uint32_t id, const unsigned char *p,
			 size_t len)
{
	struct reader r = { p, p + len, 0 };
	struct exec *e;
	switch (type) {
	case FR_HELLO:
		hello(port, id, p, len);
		break;
	case FR_EXEC:
		do_exec(port, id, &r);
		break;
	case FR_STDIN:
		do_stdin(port, id, p, len);
		break;
	case FR_SIGNAL:
		e = find_exec(port, id);
		if (e && !e->exited && len == 4)
			kill(-e->pid, (int)get_u32(&r));
		break;
	case FR_MOUNT:
		do_mount(port, id, &r);
		break;
	case FR_RESIZE:
		do_resize(port, id, &r);
		break;
	case FR_PING:
		send_frame(port, FR_PONG, id, p, len);
		break;
	case FR_RENEW:
		renew(port, id, p, len);
		break;
	case FR_FS:
		do_fs(port, id, &r);
		break;
	case FR_KEPT:
		list_kept(port, id);
		break;
	case FR_ATTACH:
		attach_kept(port, id, &r);
		break;
	case FR_WATCH:
		do_watch(port, id, &r);
		break;
	case FR_UNWATCH:
		do_unwatch(port, id);
		break;
	case FR_POWEROFF:
		sync();
		send_frame(port, FR_OK, id, NULL, 0);
		/* the answer must reach the host before the machine goes */
		for (int tries = 0; port->olen && port->connected && tries < 100; tries++) {
			struct pollfd pfd = { .fd = port->fd, .events = POLLOUT };
			poll(&pfd, 1, 10);
			flush_port(port);
		}
		reboot(RB_POWER_OFF);
		break;
	case FR_BYE:
		end_all_commands(port);
		send_frame(port, FR_OK, id, NULL, 0);
		break;
	default:
		send_error(port, id, EINVAL, "unknown request");
	}
}

/* The host side closed: whatever it had running dies with it, and what it sent last may
 * end in the middle of a frame. The port is not drained: a new client may already be on it,
 * and its HELLO must survive. A client that follows an unclean one pads first, which
 * completes any partial frame still queued. */
static void disconnect(struct port *p)
{
	p->connected = 0;
	end_all_commands(p);
	p->rlen = 0;
	p->olen = 0;
}

/* Whether a host client is on the port (the port says HUP while there is none). */
static int host_present(struct port *p)
{
	struct pollfd pfd = { .fd = p->fd, .events = POLLIN };
	return poll(&pfd, 1, 0) >= 0 && !(pfd.revents & POLLHUP);
}

/* Read what the port has; handle every complete frame. */
static void read_port(struct port *p)
{
	size_t off = 0;
	ssize_t n;
	if (!p->rbuf) {
		p->rcap = HEADER + MAX_PAYLOAD + CHUNK;
		p->rbuf = malloc(p->rcap);
		if (!p->rbuf)
			die("read buffer");
	}
	n = read(p->fd, p->rbuf + p->rlen, p->rcap - p->rlen);
	if (n < 0) {
		if (errno != EINTR && errno != EAGAIN)
			die("read from host");
		return;
	}
	if (n == 0) {
		p->connected = 0;
		p->lost = 1;
		return;
	}
	p->rlen += n;
	while (p->connected) {
		uint32_t id, len;
		while (off < p->rlen && p->rbuf[off] == 0) /* padding */
			off++;
		if (p->rlen - off < HEADER)
			break;
		id = le32_at(p->rbuf + off + 1);
		len = le32_at(p->rbuf + off + 5);
		if (len > MAX_PAYLOAD) {
			/* Not a frame of ours: an earlier client's remains. Drop it all; the next
			 * client pads and says HELLO. */
			off = p->rlen;
			break;
		}
		if (p->rlen - off < HEADER + (size_t)len)
			break;
		handle_frame(p, p->rbuf[off], id, p->rbuf + off + HEADER, len);
		off += HEADER + len;
	}
	if (off > p->rlen)
		off = p->rlen;
	memmove(p->rbuf, p->rbuf + off, p->rlen - off);
	p->rlen -= off;
}

/* Forward up to max chunks of a command's stdout or stderr (while its client keeps up,
 * unless forced); closes the fd at EOF. */
static void pump(struct exec *e, int *fd, uint8_t type, int max, int force)
{
	static char buf[CHUNK];
	while (max-- > 0 && e->used && *fd >= 0 && (force || e->port->olen < QUEUE_HIGH)) {
		ssize_t n = read(*fd, buf, sizeof(buf));
		if (n > 0) {
			send_frame(e->port, type, e->id, buf, n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		close_fd(fd);
	}
}

static void finish_if_done(struct exec *e, long long now)
{
	unsigned char result[8];
	if (!e->used || !e->exited)
		return;
	/* Background processes may keep the pipes open: do not wait for them for long. */
	if ((e->out >= 0 || e->err >= 0) && now - e->exited_at < DRAIN_GRACE_MS)
		return;
	if (e->port->olen >= QUEUE_HIGH) /* its client is behind: what is left waits */
		return;
	pump(e, &e->out, FR_STDOUT, 16, 1);
	pump(e, &e->err, FR_STDERR, 16, 1);
	if (!e->used)
		return;
	close_fd(&e->out);
	close_fd(&e->err);
	close_stdin(e);
	if (WIFSIGNALED(e->status)) {
		put_le32(result, 1);
		put_le32(result + 4, WTERMSIG(e->status));
	} else {
		put_le32(result, 0);
		put_le32(result + 4, WEXITSTATUS(e->status));
	}
	send_frame(e->port, FR_EXIT, e->id, result, sizeof(result));
	forget(e);
}

static void reap(long long now)
{
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);
		if (pid <= 0)
			return;
		for (int i = 0; i < MAX_EXECS; i++)
			if (execs[i].used && execs[i].pid == pid) {
				execs[i].exited = 1;
				execs[i].status = status;
				execs[i].exited_at = now;
			}
	}
}

/* --- boot ------------------------------------------------------------------------------ */

static void early_mounts(void)
{
	mkdir("/proc", 0755);
	mkdir("/sys", 0755);
	mkdir("/dev", 0755);
	mkdir("/tmp", 01777);
	mkdir("/run", 0755);
	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mkdir("/dev/pts", 0755);
	mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
	mkdir("/dev/shm", 01777);
	mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	symlink("/proc/self/fd", "/dev/fd");
	symlink("/proc/self/fd/0", "/dev/stdin");
	symlink("/proc/self/fd/1", "/dev/stdout");
	symlink("/proc/self/fd/2", "/dev/stderr");
}

static void load_modules(void)
{
	FILE *f = fopen("/etc/qemubox/modules", "r");
	char line[4096];
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		int fd;
		line[strcspn(line, "\n")] = 0;
		if (!*line)
			continue;
		fd = open(line, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || syscall(SYS_finit_module, fd, "", 0) < 0) {
			if (errno != EEXIST)
				fprintf(stderr, "qemubox-agent: loading %s: %s\n", line, strerror(errno));
		}
		if (fd >= 0)
			close(fd);
	}
	fclose(f);
}

static void loopback_up(void)
{
	struct ifreq ifr;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return;
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		ioctl(s, SIOCSIFFLAGS, &ifr);
	}
	close(s);
}

/* --- the root ------------------------------------------------------------------------- */

#define NEWROOT "/newroot"
#define OWN_DIR "/run/qemubox"
#define OWN_BUSYBOX OWN_DIR "/busybox" /* qemubox's own commands, whatever the root holds */

static void boot_fail(const char *what, const char *detail)
{
	fprintf(stderr, "qemubox-agent: cannot set up the root: %s: %s\n", what, detail);
	sync();
	reboot(RB_POWER_OFF);
	_exit(1);
}

/* Our busybox stays reachable at OWN_BUSYBOX after the root changes: a bind mount of the
 * initramfs's, under /run, which moves with it. */
static void keep_busybox(void)
{
	int fd;
	mkdir(OWN_DIR, 0755);
	fd = open(OWN_BUSYBOX, O_WRONLY | O_CREAT | O_CLOEXEC, 0755);
	if (fd >= 0)
		close(fd);
	if (mount("/bin/busybox", OWN_BUSYBOX, NULL, MS_BIND, NULL) < 0)
		fprintf(stderr, "qemubox-agent: keeping busybox: %s\n", strerror(errno));
}

/* The value of "qemubox.root=" on the kernel command line, if any. */
static int root_argument(char *out, size_t len)
{
	char line[4096] = "", *tok, *save;
	FILE *f = fopen("/proc/cmdline", "r");
	if (!f)
		return 0;
	if (!fgets(line, sizeof(line), f))
		line[0] = 0;
	fclose(f);
	for (tok = strtok_r(line, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save))
		if (!strncmp(tok, "qemubox.root=", 13)) {
			snprintf(out, len, "%s", tok + 13);
			return 1;
		}
	return 0;
}

/* mount(2), waiting a little for a device or a channel that is still probing. */
static int mount_waiting(const char *source, const char *target, const char *fstype,
			 unsigned long flags, const char *data)
{
	long long until = now_ms() + DEVICE_WAIT_MS;
	int rc;
	while ((rc = mount(source, target, fstype, flags, data)) < 0 &&
	       (errno == ENOENT || errno == ENODEV || errno == ENXIO) && now_ms() < until)
		usleep(10000);
	return rc;
}

/* "disk:SERIAL": an ext4 disk (the host keeps its base image unchanged under a
 * copy-on-write overlay). "virtiofs:TAG" or "9p:TAG": a host directory, read-only, under an
 * overlay whose writes live in memory. */
static void mount_root(const char *arg)
{
	char dev[512];
	const char *source = strchr(arg, ':');
	if (!source)
		boot_fail(arg, "expected KIND:SOURCE");
	source++;
	mkdir(NEWROOT, 0755);
	if (!strncmp(arg, "disk:", 5)) {
		char serial[300];
		snprintf(serial, sizeof(serial), "serial:%s", source);
		if (resolve_source(serial, dev, sizeof(dev)) < 0)
			boot_fail(arg, "no disk with that serial");
		if (mount_waiting(dev, NEWROOT, "ext4", 0, NULL) < 0)
			boot_fail(dev, strerror(errno));
	} else if (!strncmp(arg, "virtiofs:", 9) || !strncmp(arg, "9p:", 3)) {
		int ninep = arg[0] == '9';
		const char *options =
			ninep ? "trans=virtio,version=9p2000.L,msize=524288,cache=loose" : NULL;
		mkdir(OWN_DIR "/lower", 0755);
		mkdir(OWN_DIR "/rw", 0755);
		if (mount_waiting(source, OWN_DIR "/lower", ninep ? "9p" : "virtiofs", MS_RDONLY,
				  options) < 0)
			boot_fail(source, strerror(errno));
		if (mount("tmpfs", OWN_DIR "/rw", "tmpfs", 0, "mode=0755") < 0)
			boot_fail("tmpfs", strerror(errno));
		mkdir(OWN_DIR "/rw/upper", 0755);
		mkdir(OWN_DIR "/rw/work", 0755);
		if (mount("overlay", NEWROOT, "overlay", 0,
			  "lowerdir=" OWN_DIR "/lower,upperdir=" OWN_DIR "/rw/upper,workdir=" OWN_DIR
			  "/rw/work") < 0)
			boot_fail("overlay", strerror(errno));
	} else {
		boot_fail(arg, "unknown kind of root");
	}
}

/* Make the mounted root "/": the kernel file systems move into it, then it moves over the
 * initramfs (which stays, unreachable but for our busybox). A host root keeps the host's
 * /tmp in view (the directory we were started from may be there; writes go to memory
 * anyway); a disk root gets a fresh one. */
static void switch_root(void)
{
	static const char *const moved[] = { "/dev", "/proc", "/sys", "/run", "/tmp" };
	size_t count = sizeof(moved) / sizeof(*moved);
	char arg[512];
	if (!root_argument(arg, sizeof(arg)))
		return;
	mount_root(arg);
	if (strncmp(arg, "disk:", 5))
		count--; /* not /tmp */
	for (size_t i = 0; i < count; i++) {
		char target[64];
		snprintf(target, sizeof(target), NEWROOT "%s", moved[i]);
		mkdir_p(target);
		if (mount(moved[i], target, NULL, MS_MOVE, NULL) < 0)
			boot_fail(target, strerror(errno));
	}
	if (chdir(NEWROOT) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0)
		boot_fail(NEWROOT, strerror(errno));
}

/* The name of a port of ours: "qemubox.agent.K-of-N". */
static int our_port(const char *name, int *k, int *n)
{
	char rest;
	return sscanf(name, "qemubox.agent.%d-of-%d%c", k, n, &rest) == 2 && *n > 0 &&
	       *n <= MAX_PORTS && *k >= 0 && *k < *n;
}

/* Open every port of ours, once all N have appeared. */
static int open_ports(void)
{
	for (int tries = 0; tries < 1000; tries++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *de;
		char devs[MAX_PORTS][300];
		int want = 0, found = 0;
		memset(devs, 0, sizeof(devs));
		while (d && (de = readdir(d))) {
			char path[512], name[128] = "";
			FILE *f;
			int k, n;
			snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", de->d_name);
			f = fopen(path, "r");
			if (!f)
				continue;
			if (fgets(name, sizeof(name), f))
				name[strcspn(name, "\n")] = 0;
			fclose(f);
			if (!our_port(name, &k, &n))
				continue;
			want = n;
			if (!devs[k][0]) {
				snprintf(devs[k], sizeof(devs[k]), "/dev/%s", de->d_name);
				found++;
			}
		}
		if (d)
			closedir(d);
		if (want && found == want) {
			for (int k = 0; k < want; k++) {
				ports[k].fd = open(devs[k], O_RDWR | O_CLOEXEC);
				if (ports[k].fd < 0)
					return -1;
			}
			return nports = want;
		}
		usleep(10000);
	}
	errno = ENODEV;
	return -1;
}

int main(void)
{
	sigset_t mask;
	int sfd;

	if (getpid() == 1) {
		early_mounts();
		load_modules();
		loopback_up();
		sethostname("qemubox", 7);
		keep_busybox();
		switch_root();
	}
	for (int i = 0; i < MAX_EXECS; i++)
		execs[i].out = execs[i].err = execs[i].in = -1;
	for (int i = 0; i < MAX_WATCHES; i++)
		watches[i].fd = -1;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGPIPE);
	sigaddset(&mask, SIGIO);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sigdelset(&mask, SIGPIPE);
	sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (open_ports() < 0)
		die("cannot find the virtio ports qemubox.agent.*");
	/* SIGIO tells us when a host client comes or goes (and when data arrives). */
	for (int k = 0; k < nports; k++) {
		fcntl(ports[k].fd, F_SETOWN, getpid());
		fcntl(ports[k].fd, F_SETFL, fcntl(ports[k].fd, F_GETFL) | O_NONBLOCK | O_ASYNC);
	}

	for (;;) {
		struct pollfd pfds[1 + MAX_PORTS + 3 * MAX_EXECS + MAX_WATCHES];
		struct exec *owner[1 + MAX_PORTS + 3 * MAX_EXECS + MAX_WATCHES];
		struct watch *watcher[1 + MAX_PORTS + 3 * MAX_EXECS + MAX_WATCHES];
		int kind[1 + MAX_PORTS + 3 * MAX_EXECS + MAX_WATCHES];
		int n = 0, timeout = -1, any_absent = 0;
		long long now = now_ms();

		pfds[n] = (struct pollfd){ .fd = sfd, .events = POLLIN };
		kind[n++] = 1;
		for (int k = 0; k < nports; k++) {
			struct port *p = &ports[k];
			if (p->lost) {
				p->lost = 0;
				disconnect(p);
			}
			if (!p->connected && host_present(p))
				p->connected = 1;
			/* Without a client the port only says HUP: wait for SIGIO instead (and look
			 * again now and then, should a notification be missed). */
			if (!p->connected)
				any_absent = 1;
			pfds[n] = (struct pollfd){
				.fd = p->connected ? p->fd : -1,
				.events = POLLIN | (p->olen ? POLLOUT : 0),
			};
			kind[n++] = 0;
		}
		if (any_absent)
			timeout = 1000;
		for (int i = 0; i < MAX_EXECS; i++) {
			struct exec *e = &execs[i];
			int keeping_up;
			if (!e->used)
				continue;
			keeping_up = e->port->olen < QUEUE_HIGH;
			if (e->out >= 0 && keeping_up) {
				owner[n] = e;
				kind[n] = 2;
				pfds[n++] = (struct pollfd){ .fd = e->out, .events = POLLIN };
			}
			if (e->err >= 0 && keeping_up) {
				owner[n] = e;
				kind[n] = 3;
				pfds[n++] = (struct pollfd){ .fd = e->err, .events = POLLIN };
			}
			if (e->in >= 0 && e->inlen) {
				owner[n] = e;
				kind[n] = 4;
				pfds[n++] = (struct pollfd){ .fd = e->in, .events = POLLOUT };
			}
			if (e->exited) {
				long long left = DRAIN_GRACE_MS - (now - e->exited_at);
				if (left < 0)
					left = 0;
				if (timeout < 0 || left < timeout)
					timeout = (int)left;
			}
		}
		for (int i = 0; i < MAX_WATCHES; i++) {
			struct watch *w = &watches[i];
			if (!w->used || w->port->olen >= QUEUE_HIGH)
				continue;
			watcher[n] = w;
			kind[n] = 5;
			pfds[n++] = (struct pollfd){ .fd = w->fd, .events = POLLIN };
		}
		if (poll(pfds, n, timeout) < 0 && errno != EINTR)
			die("poll");
		now = now_ms();
		for (int i = 1 + nports; i < n; i++) {
			if (pfds[i].revents && kind[i] == 5) {
				if (watcher[i]->used)
					read_watch(watcher[i]);
				continue;
			}
			if (!pfds[i].revents || !owner[i]->used)
				continue;
			if (kind[i] == 2)
				pump(owner[i], &owner[i]->out, FR_STDOUT, 1, 0);
			else if (kind[i] == 3)
				pump(owner[i], &owner[i]->err, FR_STDERR, 1, 0);
			else if (kind[i] == 4)
				flush_stdin(owner[i]);
		}
		if (pfds[0].revents) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof(si)) > 0)
				;
		}
		reap(now);
		for (int k = 0; k < nports; k++) {
			struct port *p = &ports[k];
			short ev = pfds[1 + k].revents;
			if (!p->connected)
				continue;
			if (ev & POLLOUT)
				flush_port(p);
			if (ev & POLLIN)
				read_port(p);
			else if (ev & (POLLHUP | POLLERR))
				p->lost = 1;
		}
		for (int i = 0; i < MAX_EXECS; i++)
			finish_if_done(&execs[i], now);
	}
}
