/* A hostile guest program for the tests: run as root in the guest, it takes the agent's
 * virtio port from PID 1 (pidfd_getfd) and speaks to the host in the agent's name, or
 * ptrace-stops the agent so that nothing reads the port.
 *
 *   hostile huge    a frame header claiming a 4 GiB payload, then a stream of bytes
 *   hostile short   EXIT frames with a 3-byte payload (for every likely request id)
 *   hostile ok      OK frames for every likely request id (an exec id among them)
 *   hostile stop    stop the agent and sleep
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FR_EXIT 23
#define FR_OK 25
#define FR_STDOUT 21

static int agent_port(void)
{
	char link[256], path[300];
	DIR *d = opendir("/proc/1/fd");
	struct dirent *de;
	int pidfd = syscall(SYS_pidfd_open, 1, 0);
	if (!d || pidfd < 0) {
		perror("pidfd_open");
		exit(2);
	}
	while ((de = readdir(d))) {
		ssize_t n;
		snprintf(path, sizeof(path), "/proc/1/fd/%s", de->d_name);
		n = readlink(path, link, sizeof(link) - 1);
		if (n <= 0)
			continue;
		link[n] = 0;
		if (strncmp(link, "/dev/vport", 10) == 0) {
			int fd = syscall(SYS_pidfd_getfd, pidfd, atoi(de->d_name), 0);
			if (fd < 0) {
				perror("pidfd_getfd");
				exit(2);
			}
			return fd;
		}
	}
	fprintf(stderr, "no agent port in /proc/1/fd\n");
	exit(2);
}

static void frame(int fd, uint8_t type, uint32_t id, uint32_t len, const void *p, size_t n)
{
	unsigned char buf[9 + 64];
	buf[0] = type;
	memcpy(buf + 1, &id, 4);
	memcpy(buf + 5, &len, 4);
	memcpy(buf + 9, p, n);
	if (write(fd, buf, 9 + n) < 0 && errno != EAGAIN)
		perror("write");
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	if (!strcmp(mode, "stop")) {
		if (ptrace(PTRACE_SEIZE, 1, 0, 0) || ptrace(PTRACE_INTERRUPT, 1, 0, 0)) {
			perror("ptrace");
			return 2;
		}
		for (;;)
			pause();
	}
	int fd = agent_port();
	if (!strcmp(mode, "huge")) {
		static char junk[65536];
		memset(junk, 'A', sizeof(junk));
		frame(fd, FR_STDOUT, 1, 0xFFFFFFF0u, "", 0);
		for (int i = 0; i < 4096; i++) /* 256 MiB, if the host keeps taking it */
			if (write(fd, junk, sizeof(junk)) < 0)
				usleep(1000);
	} else if (!strcmp(mode, "short")) {
		for (uint32_t id = 1; id < 32; id++)
			frame(fd, FR_EXIT, id, 3, "\1\2\3", 3);
	} else if (!strcmp(mode, "ok")) {
		for (uint32_t id = 1; id < 32; id++)
			frame(fd, FR_OK, id, 0, "", 0);
	} else {
		fprintf(stderr, "usage: hostile huge|short|ok|stop\n");
		return 2;
	}
	sleep(30);
	return 0;
}
