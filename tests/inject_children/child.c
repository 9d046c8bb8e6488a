/* A target for tests/test_inject.py: maps a buffer, prints its address, then
 * serves line commands from stdin while it sleeps, reads, spins or counts
 * signals, depending on argv[1]:
 *   sleep    nanosleep(1 ms) loop, stdin polled non-blocking
 *   pipe     blocked in read(0) until a command arrives
 *   threads  like sleep, plus 3 threads each writing its own page 0..2 in a loop
 *   signals  like sleep, counting SIGUSR1 and SIGRTMIN in handlers
 * Commands: "w N" writes page N and answers "wrote N"; "t" answers the loop
 * count; "c" the worker counters; "n" the signal counts; "q" exits.
 * An unexpected EINTR is reported as a line "EINTR <where>". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define NPAGES 64
#define PAGE 4096

static volatile unsigned char *buf;
static volatile long loops, workers[3];
static volatile sig_atomic_t usr1, rt;
static int signals_mode;

static void say(const char *fmt, long a, long b, long c)
{
	char line[128];
	int n = snprintf(line, sizeof(line), fmt, a, b, c);
	if (write(1, line, n) != n)
		_exit(3);
}

static void on_usr1(int sig) { (void)sig; usr1++; if (write(1, "u\n", 2) != 2) _exit(3); }
static void on_rt(int sig) { (void)sig; rt++; }

static void *worker(void *arg)
{
	long i = (long)arg;
	for (;;) {
		buf[i * PAGE + (workers[i] & 63)]++;
		workers[i]++;
	}
	return NULL;
}

static void command(char *line)
{
	long n;
	if (sscanf(line, "w %ld", &n) == 1 && n >= 0 && n < NPAGES) {
		buf[n * PAGE + 17]++;
		say("wrote %ld\n", n, 0, 0);
	} else if (line[0] == 't') {
		say("loops %ld\n", loops, 0, 0);
	} else if (line[0] == 'c') {
		say("workers %ld %ld %ld\n", workers[0], workers[1], workers[2]);
	} else if (line[0] == 'n') {
		say("count %ld %ld\n", usr1, rt, 0);
	} else if (line[0] == 'q') {
		exit(0);
	}
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "sleep";
	char in[4096];
	size_t have = 0;
	int blocking = strcmp(mode, "pipe") == 0;
	struct timespec ts = {0, 1000000};

	buf = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		return 2;
	madvise((void *)buf, NPAGES * PAGE, MADV_NOHUGEPAGE);
	memset((void *)buf, 1, NPAGES * PAGE);
	if (strcmp(mode, "signals") == 0) {
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_usr1;       /* no SA_RESTART: EINTR is the signal's, not ours */
		sigaction(SIGUSR1, &sa, NULL);
		sa.sa_handler = on_rt;
		sigaction(SIGRTMIN, &sa, NULL);
		signals_mode = 1;
	}
	if (strcmp(mode, "threads") == 0) {
		pthread_t th;
		for (long i = 0; i < 3; i++)
			pthread_create(&th, NULL, worker, (void *)i);
	}
	if (!blocking)
		fcntl(0, F_SETFL, O_NONBLOCK);
	say("buf %ld %ld\n", (long)buf, NPAGES, 0);
	for (;;) {
		ssize_t got;
		char *nl;
		if (!blocking && nanosleep(&ts, NULL) < 0 && errno == EINTR && !signals_mode)
			say("EINTR nanosleep\n", 0, 0, 0);
		loops++;
		got = read(0, in + have, sizeof(in) - 1 - have);
		if (got < 0 && errno == EINTR && !signals_mode)
			say("EINTR read\n", 0, 0, 0);
		if (got == 0)
			return 0;                  /* stdin closed: the test is over */
		if (got > 0)
			have += got;
		in[have] = 0;
		while ((nl = strchr(in, '\n')) != NULL) {
			*nl = 0;
			command(in);
			have -= nl + 1 - in;
			memmove(in, nl + 1, have + 1);
		}
	}
}
