/* raw_scan.c - the baseline for bench_scan.py: a bare C loop around
 * PAGEMAP_SCAN, doing what dirtytrack's scan_range() does and nothing else.
 *
 * Built at run time by bench_scan.py (cc -O2 -shared -fPIC) into bench/out/
 * and called through ctypes, which releases the GIL around every call.
 *
 * It declares its own minimal PAGEMAP_SCAN ABI (Linux 6.7+, from the kernel's
 * include/uapi/linux/fs.h): the system headers on Debian 12 predate it. It
 * deliberately does not include ext/dirtytrack/kernel_abi.h, so a mistake
 * there cannot hide in both sides of the comparison.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

struct bench_pm_scan_arg {          /* 12 x u64 = 96 bytes */
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

struct bench_page_region {
    uint64_t start;
    uint64_t end;                   /* exclusive */
    uint64_t categories;
};

#define BENCH_PAGEMAP_SCAN     0xC0606610UL   /* _IOWR('f', 16, struct pm_scan_arg) */
#define BENCH_PM_SCAN_WP_MATCHING   (1UL << 0)
#define BENCH_PM_SCAN_CHECK_WPASYNC (1UL << 1)
#define BENCH_PAGE_IS_WRITTEN       (1UL << 1)

_Static_assert(sizeof(struct bench_pm_scan_arg) == 96, "pm_scan_arg is 12 x u64");
_Static_assert(sizeof(struct bench_page_region) == 24, "page_region is 3 x u64");
_Static_assert(_IOWR('f', 16, struct bench_pm_scan_arg) == BENCH_PAGEMAP_SCAN,
               "PAGEMAP_SCAN request number");

/* The loop itself. trust_walk_end = 0 is dirtytrack's scan_range() since
 * commit 24634e7: after each call, resume past the last region returned when
 * that is beyond walk_end. Linux 6.7-6.18's do_pagemap_scan() returns a stale
 * walk_end from a call that flushed its 512-entry bounce buffer and then
 * finished the range (seen here: where the last flush happened, e.g. page
 * 256000 of 262144 with the last region ending at 262101), so trusting
 * walk_end alone re-walks that tail in one more call. trust_walk_end = 1 is
 * that older loop, kept to measure what the quirk costs. */
static long scan_loop(int pagemap_fd, uint64_t start, uint64_t end, void *vec, uint64_t vec_len,
                      uint64_t *pages_out, int trust_walk_end)
{
    struct bench_page_region *v = vec;
    struct bench_pm_scan_arg arg;
    uint64_t pos = start, bytes = 0;
    long calls = 0, n, i;

    while (pos < end) {
        memset(&arg, 0, sizeof(arg));
        arg.size = sizeof(arg);
        arg.flags = BENCH_PM_SCAN_WP_MATCHING | BENCH_PM_SCAN_CHECK_WPASYNC;
        arg.start = pos;
        arg.end = end;
        arg.vec = (uint64_t)(uintptr_t)v;
        arg.vec_len = vec_len;
        arg.category_mask = BENCH_PAGE_IS_WRITTEN;
        arg.return_mask = BENCH_PAGE_IS_WRITTEN;
        n = ioctl(pagemap_fd, BENCH_PAGEMAP_SCAN, &arg);
        calls++;
        if (n < 0)
            return -errno;
        for (i = 0; i < n; i++)
            bytes += v[i].end - v[i].start;
        if (arg.walk_end <= pos || arg.walk_end > end)
            return -EIO;
        pos = arg.walk_end;
        if (!trust_walk_end && n > 0 && v[n - 1].end > pos)
            pos = v[n - 1].end < end ? v[n - 1].end : end;
    }
    *pages_out = bytes >> 12;
    return calls;
}

/* Scan [start, end) for written pages and write-protect them again (get and
 * reset), looping until end exactly like dirtytrack's scan_range(). Returns
 * the number of ioctl calls made, or -errno. *pages_out gets the number of
 * written pages found (4 KiB pages). */
long raw_scan(int pagemap_fd, uint64_t start, uint64_t end, void *vec, uint64_t vec_len,
              uint64_t *pages_out)
{
    return scan_loop(pagemap_fd, start, end, vec, vec_len, pages_out, 0);
}

/* The same, resuming from walk_end only (the loop before commit 24634e7). */
long raw_scan_trust_walk_end(int pagemap_fd, uint64_t start, uint64_t end, void *vec,
                             uint64_t vec_len, uint64_t *pages_out)
{
    return scan_loop(pagemap_fd, start, end, vec, vec_len, pages_out, 1);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* raw_scan() (or, with trust_walk_end, raw_scan_trust_walk_end()) timed from
 * inside C, so the baseline carries no ctypes cost. *ns_out gets the elapsed
 * CLOCK_MONOTONIC nanoseconds. */
long raw_scan_timed(int pagemap_fd, uint64_t start, uint64_t end, void *vec, uint64_t vec_len,
                    uint64_t *pages_out, uint64_t *ns_out, int trust_walk_end)
{
    uint64_t t0 = now_ns();
    long rc = scan_loop(pagemap_fd, start, end, vec, vec_len, pages_out, trust_walk_end);
    *ns_out = now_ns() - t0;
    return rc;
}

uint64_t monotonic_ns(void)
{
    return now_ns();
}

/* Write one byte in every `stride`-th page of base[0 .. npages pages), from
 * page `first`. stride 1 = every page, 100 = 1%. Returns pages written. The
 * byte written changes every call so the compiler cannot elide the store. */
uint64_t touch_pages(char *base, uint64_t npages, uint64_t first, uint64_t stride)
{
    static unsigned char tick;
    volatile char *p = (volatile char *)base;
    uint64_t i, n = 0;

    tick++;
    if (stride == 0)
        return 0;
    for (i = first; i < npages; i += stride) {
        p[i << 12] = (char)(tick + i);
        n++;
    }
    return n;
}

/* Write one byte in each listed page (a fixed random set). Returns count. */
uint64_t touch_list(char *base, const uint64_t *pages, uint64_t count)
{
    static unsigned char tick;
    volatile char *p = (volatile char *)base;
    uint64_t i;

    tick++;
    for (i = 0; i < count; i++)
        p[pages[i] << 12] = (char)(tick + i);
    return count;
}
