/*
 * kernel_abi.h - every piece of kernel ABI dirtytrack uses, in one place.
 *
 * The build machines' /usr/include/linux headers predate Linux 6.7, so anything
 * newer is declared here, guarded so that newer system headers win.  Each item
 * names the uapi header it comes from and the kernel release that added it.
 * Values are checked against the running kernel at run time (probe.pxi), never
 * assumed: an old kernel gets a clear error instead of an EINVAL mystery.
 */
#ifndef DIRTYTRACK_KERNEL_ABI_H
#define DIRTYTRACK_KERNEL_ABI_H

#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>   /* struct uffdio_{api,range,register,writeprotect}: stable since 4.3 */
#include <linux/fs.h>

/* ---- syscall numbers (asm-generic/unistd.h and arch tables) ------------- */
#ifndef SYS_userfaultfd
# if defined(__x86_64__)
#  define SYS_userfaultfd 323
# elif defined(__aarch64__)
#  define SYS_userfaultfd 282
# else
#  error "dirtytrack: add SYS_userfaultfd for this architecture"
# endif
#endif
#ifndef SYS_pidfd_open          /* 5.3, same number on every architecture */
# define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd         /* 5.6, same number on every architecture */
# define SYS_pidfd_getfd 438
#endif

/* ---- include/uapi/linux/userfaultfd.h ------------------------------------ */
#ifndef UFFD_USER_MODE_ONLY     /* 5.11: flag to userfaultfd(2); allowed when
                                   vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE */
# define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW     /* 6.1: ioctl on /dev/userfaultfd */
# define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
# define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)  /* 5.19 */
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
# define UFFD_FEATURE_WP_UNPOPULATED     (1 << 13)  /* 6.4: protect never-touched pages too */
#endif
#ifndef UFFD_FEATURE_POISON
# define UFFD_FEATURE_POISON             (1 << 14)  /* 6.6 */
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
# define UFFD_FEATURE_WP_ASYNC           (1 << 15)  /* 6.7: kernel resolves WP faults itself */
#endif
#ifndef UFFD_FEATURE_MOVE
# define UFFD_FEATURE_MOVE               (1 << 16)  /* 6.8 */
#endif

/* ---- include/uapi/linux/fs.h: PAGEMAP_SCAN (6.7) -------------------------- */
#ifndef PAGEMAP_SCAN
/* Page categories, reported in page_region.categories and used as masks. */
# define PAGE_IS_WPALLOWED   (1 << 0)   /* 6.7 */
# define PAGE_IS_WRITTEN     (1 << 1)   /* 6.7: uffd-wp bit clear = written since last protect */
# define PAGE_IS_FILE        (1 << 2)   /* 6.7 */
# define PAGE_IS_PRESENT     (1 << 3)   /* 6.7 */
# define PAGE_IS_SWAPPED     (1 << 4)   /* 6.7 */
# define PAGE_IS_PFNZERO     (1 << 5)   /* 6.7 */
# define PAGE_IS_HUGE        (1 << 6)   /* 6.7 */

struct page_region {
	__u64 start;        /* first byte of the run */
	__u64 end;          /* one past its last byte */
	__u64 categories;   /* PAGE_IS_* of every page in the run, masked by return_mask */
};

# define PM_SCAN_WP_MATCHING    (1 << 0)   /* write-protect the pages it reports */
# define PM_SCAN_CHECK_WPASYNC  (1 << 1)   /* EPERM on a VMA without async-WP, never skip it */
# define PM_SCAN_FLAGS          (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC)

struct pm_scan_arg {
	__u64 size;                 /* sizeof(struct pm_scan_arg) */
	__u64 flags;                /* PM_SCAN_* */
	__u64 start;                /* page aligned */
	__u64 end;                  /* exclusive */
	__u64 walk_end;             /* out: where the walk stopped; resume from here */
	__u64 vec;                  /* user pointer to struct page_region[vec_len] */
	__u64 vec_len;
	__u64 max_pages;            /* 0 = no limit */
	__u64 category_inverted;
	__u64 category_mask;
	__u64 category_anyof_mask;
	__u64 return_mask;
};

# define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif
#ifndef PAGE_IS_SOFT_DIRTY
# define PAGE_IS_SOFT_DIRTY  (1 << 7)   /* 6.8 */
#endif

/* ---- include/uapi/linux/fs.h: PROCMAP_QUERY (6.11), on /proc/PID/maps ----- */
#ifndef PROCMAP_QUERY
enum procmap_query_flags {
	PROCMAP_QUERY_VMA_READABLE          = 0x01,
	PROCMAP_QUERY_VMA_WRITABLE          = 0x02,
	PROCMAP_QUERY_VMA_EXECUTABLE        = 0x04,
	PROCMAP_QUERY_VMA_SHARED            = 0x08,
	PROCMAP_QUERY_COVERING_OR_NEXT_VMA  = 0x10,
	PROCMAP_QUERY_FILE_BACKED_VMA       = 0x20,
};

struct procmap_query {
	__u64 size;
	__u64 query_flags;
	__u64 query_addr;
	__u64 vma_start;            /* out */
	__u64 vma_end;              /* out */
	__u64 vma_flags;            /* out: PROCMAP_QUERY_VMA_* */
	__u64 vma_page_size;        /* out */
	__u64 vma_offset;           /* out */
	__u64 inode;                /* out */
	__u32 dev_major;            /* out */
	__u32 dev_minor;            /* out */
	__u32 vma_name_size;        /* in/out; 0 = do not return the name */
	__u32 build_id_size;        /* in/out; 0 = do not return the build id */
	__u64 vma_name_addr;
	__u64 build_id_addr;
};

# define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#endif

/* The layouts above are ABI: catch a typo at compile time, not in the field. */
_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg is 12 u64");
_Static_assert(sizeof(struct page_region) == 24, "page_region is 3 u64");
_Static_assert(sizeof(struct procmap_query) == 104, "procmap_query layout");

#endif /* DIRTYTRACK_KERNEL_ABI_H */
