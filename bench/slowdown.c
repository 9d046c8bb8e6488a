/* slowdown.c - the cost a tracked program pays: a write-heavy loop over a
 * buffer, run untracked, under an in-process mprotect+SIGSEGV tracker (the
 * classic way: bdwgc, old VMMs), or untouched while dirtytrack tracks it from
 * outside. Every INTERVAL_MS the tracker re-arms (mprotect: the loop's own
 * helper thread re-protects everything; dirtytrack: the bench collects).
 *
 * usage: slowdown MODE MIB SECONDS INTERVAL_MS [STRIDE]
 *   MODE: plain | mprotect
 * Prints "ready PID ADDR" and waits for a line on stdin before starting (so
 * dirtytrack can attach first); then prints "writes N seconds S dirty D".  */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
static unsigned char *buf;
static size_t npages;
static volatile int done;
static unsigned char *dirty;          /* mprotect mode: one byte a page */
static volatile uint64_t faults;
static unsigned interval_ms;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void on_segv(int sig, siginfo_t *si, void *ctx)
{
	(void)sig; (void)ctx;
	uintptr_t page = ((uintptr_t)si->si_addr - (uintptr_t)buf) / PAGE;
	if (page >= npages)
		abort();
	dirty[page] = 1;
	faults++;
	mprotect(buf + page * PAGE, PAGE, PROT_READ | PROT_WRITE);
}

static void *rearm(void *arg)
{
	(void)arg;
	while (!done) {
		usleep(interval_ms * 1000);
		memset(dirty, 0, npages);            /* "collect" */
		mprotect(buf, npages * PAGE, PROT_READ);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: %s plain|mprotect MIB SECONDS INTERVAL_MS [STRIDE]\n", argv[0]);
		return 2;
	}
	int mprotect_mode = strcmp(argv[1], "mprotect") == 0;
	npages = strtoul(argv[2], NULL, 0) * (1 << 20) / PAGE;
	double seconds = atof(argv[3]);
	interval_ms = atoi(argv[4]);
	unsigned long stride = argc > 5 ? strtoul(argv[5], NULL, 0) : 1;
	buf = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	madvise(buf, npages * PAGE, MADV_NOHUGEPAGE);
	memset(buf, 1, npages * PAGE);
	pthread_t helper;
	if (mprotect_mode) {
		struct sigaction sa = {0};
		sa.sa_sigaction = on_segv;
		sa.sa_flags = SA_SIGINFO;
		sigaction(SIGSEGV, &sa, NULL);
		dirty = calloc(npages, 1);
		mprotect(buf, npages * PAGE, PROT_READ);
		pthread_create(&helper, NULL, rearm, NULL);
	}
	printf("ready %d %lu\n", getpid(), (unsigned long)buf);
	fflush(stdout);
	char line[16];
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	/* Write one byte per page, walking the buffer with a stride, as fast as
	 * possible: the worst case for a write tracker (every write may fault). */
	uint64_t writes = 0;
	size_t page = 0;
	double start = now(), end = start + seconds;
	while (1) {
		for (int i = 0; i < 4096; i++) {
			buf[page * PAGE + (writes & 63)]++;
			writes++;
			page += stride;
			if (page >= npages)
				page -= npages;
		}
		if (now() >= end)
			break;
	}
	double took = now() - start;
	done = 1;
	if (mprotect_mode)
		pthread_join(helper, NULL);
	printf("writes %lu seconds %.3f faults %lu\n", (unsigned long)writes, took,
	       (unsigned long)faults);
	return 0;
}
