/* A tracked process for tests/test_attach.py: it does what the test tells it
 * on stdin, one command a line, and answers one line per command, so the test
 * knows exactly what was written (ground truth).
 *
 *   map N              mmap N private anonymous pages      -> "addr A"
 *   mapshm N           N pages of a memfd, MAP_SHARED      -> "addr A fd F"
 *   mapfd F N          map memfd F again, MAP_SHARED       -> "addr A"
 *   open PATH          open(PATH, O_RDWR)                  -> "fd F"
 *   write A N S        write byte S into each of N pages from A   -> "ok"
 *   unmap A N          munmap                              -> "ok"
 *   remap A N M        mremap(MAYMOVE) to M pages          -> "addr A2"
 *   dontneed A N       madvise(MADV_DONTNEED)              -> "ok"
 *   protect A N P      mprotect to P (0 none, 1 r, 3 rw)   -> "ok"
 *   writer A N E       start a thread writing random pages of [A, A+N pages),
 *                      logging each as "page F S" where F / S are the words at
 *                      E (collects finished) and E+8 (collects started) read
 *                      before / after the write: the cross-process version of
 *                      dirtytrack.verify.WriteLog             -> "ok"
 *   stop               stop the writer, print its log, then "stopped"
 *   seccomp            install an allow-everything seccomp filter (it survives
 *                      exec, and makes ptrace injection refuse the process)  -> "ok"
 *   exec               exec this program again with no commands pending
 *   exit               exit(0)
 * Errors answer "err <errno>". While idle it sleeps in read(0).  */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static volatile int writer_stop;
static pthread_t writer_thread;
static unsigned long w_base, w_npages;
static volatile uint64_t *epochs;
static unsigned long *w_log;             /* triples: page, F, S */
static size_t w_count, w_cap;

static void *writer(void *arg)
{
	uint64_t x = 88172645463325252ULL;
	(void)arg;
	while (!writer_stop) {
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;
		unsigned long page = x % w_npages;
		uint64_t first = __atomic_load_n(&epochs[0], __ATOMIC_SEQ_CST);
		volatile unsigned char *p = (unsigned char *)(w_base + page * PAGE + (x >> 40) % PAGE);
		*p = (unsigned char)x;
		uint64_t last = __atomic_load_n(&epochs[1], __ATOMIC_SEQ_CST);
		if (w_count == w_cap) {
			w_cap = w_cap ? w_cap * 2 : 1 << 16;
			w_log = realloc(w_log, w_cap * 3 * sizeof(*w_log));
			if (!w_log)
				abort();
		}
		w_log[3 * w_count] = page;
		w_log[3 * w_count + 1] = first;
		w_log[3 * w_count + 2] = last;
		w_count++;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	char line[256];
	unsigned long a, n, m, s;
	int fd;
	(void)argc;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", getpid());
	while (fgets(line, sizeof(line), stdin)) {
		void *r;
		errno = 0;
		if (sscanf(line, "map %lu", &n) == 1) {
			r = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (r == MAP_FAILED) goto fail;
			madvise(r, n * PAGE, MADV_NOHUGEPAGE);
			printf("addr %lu\n", (unsigned long)r);
		} else if (sscanf(line, "mapshm %lu", &n) == 1) {
			fd = memfd_create("dirtytrack-test", 0);
			if (fd < 0 || ftruncate(fd, n * PAGE)) goto fail;
			r = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
			if (r == MAP_FAILED) goto fail;
			printf("addr %lu fd %d\n", (unsigned long)r, fd);
		} else if (sscanf(line, "mapfd %d %lu", &fd, &n) == 2) {
			r = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
			if (r == MAP_FAILED) goto fail;
			printf("addr %lu\n", (unsigned long)r);
		} else if (strncmp(line, "open ", 5) == 0) {
			line[strcspn(line, "\n")] = 0;
			fd = open(line + 5, O_RDWR);
			if (fd < 0) goto fail;
			printf("fd %d\n", fd);
		} else if (sscanf(line, "write %lu %lu %lu", &a, &n, &s) == 3) {
			for (unsigned long i = 0; i < n; i++)
				((volatile unsigned char *)a)[i * PAGE + 7] = (unsigned char)s;
			printf("ok\n");
		} else if (sscanf(line, "unmap %lu %lu", &a, &n) == 2) {
			if (munmap((void *)a, n * PAGE)) goto fail;
			printf("ok\n");
		} else if (sscanf(line, "remap %lu %lu %lu", &a, &n, &m) == 3) {
			r = mremap((void *)a, n * PAGE, m * PAGE, MREMAP_MAYMOVE);
			if (r == MAP_FAILED) goto fail;
			printf("addr %lu\n", (unsigned long)r);
		} else if (sscanf(line, "dontneed %lu %lu", &a, &n) == 2) {
			if (madvise((void *)a, n * PAGE, MADV_DONTNEED)) goto fail;
			printf("ok\n");
		} else if (sscanf(line, "protect %lu %lu %lu", &a, &n, &s) == 3) {
			if (mprotect((void *)a, n * PAGE, (int)s)) goto fail;
			printf("ok\n");
		} else if (sscanf(line, "writer %lu %lu %lu", &a, &n, &s) == 3) {
			w_base = a; w_npages = n; epochs = (volatile uint64_t *)s;
			writer_stop = 0; w_count = 0;
			if (pthread_create(&writer_thread, NULL, writer, NULL)) goto fail;
			printf("ok\n");
		} else if (strncmp(line, "stop", 4) == 0) {
			writer_stop = 1;
			pthread_join(writer_thread, NULL);
			for (size_t i = 0; i < w_count; i++)
				printf("page %lu %lu %lu\n", w_log[3 * i], w_log[3 * i + 1], w_log[3 * i + 2]);
			printf("stopped\n");
		} else if (strncmp(line, "seccomp", 7) == 0) {
			struct sock_filter allow = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
			struct sock_fprog prog = { .len = 1, .filter = &allow };
			if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
			    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) goto fail;
			printf("ok\n");
		} else if (strncmp(line, "exec", 4) == 0) {
			fflush(stdout);
			execv("/proc/self/exe", argv);
			goto fail;
		} else if (strncmp(line, "exit", 4) == 0) {
			exit(0);
		} else {
			errno = EINVAL;
			goto fail;
		}
		continue;
fail:
		printf("err %d\n", errno);
	}
	return 0;
}
