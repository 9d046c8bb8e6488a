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

/* ---- ptrace(2) and pidfd, for injecting userfaultfd() into another process -
 * include/uapi/linux/ptrace.h. <linux/ptrace.h> (not glibc's <sys/ptrace.h>,
 * whose requests are enum members that #ifndef cannot see) supplies them on
 * Debian 12; the guards below only fill gaps of older headers. */
#include <linux/ptrace.h>
#include <sys/uio.h>              /* process_vm_readv (glibc 2.15) */
#include <sys/wait.h>
#include <signal.h>
#include <sys/user.h>             /* struct user_regs_struct / user_pt_regs */
#ifndef PTRACE_SEIZE              /* 3.4 */
# define PTRACE_SEIZE      0x4206
# define PTRACE_INTERRUPT  0x4207
#endif
#ifndef PTRACE_GETSIGMASK         /* 3.11: blocked mask of a stopped tracee */
# define PTRACE_GETSIGMASK 0x420a
# define PTRACE_SETSIGMASK 0x420b
#endif
#ifndef PTRACE_GETREGSET          /* 2.6.34 */
# define PTRACE_GETREGSET  0x4204
# define PTRACE_SETREGSET  0x4205
#endif
#ifndef PTRACE_EVENT_STOP         /* 3.4: status>>16 of a SEIZE'd tracee's group-stop / INTERRUPT trap */
# define PTRACE_EVENT_STOP 128
#endif
#ifndef NT_PRSTATUS               /* include/uapi/linux/elf.h: general registers for GETREGSET */
# define NT_PRSTATUS 1
#endif
#ifndef __WALL                    /* include/uapi/linux/wait.h: wait for clone()d threads too */
# define __WALL 0x40000000
#endif
#ifndef SYS_close
# error "dirtytrack: SYS_close missing from <sys/syscall.h>"
#endif
#ifndef SYS_ptrace
# error "dirtytrack: SYS_ptrace missing from <sys/syscall.h>"
#endif
#ifndef SYS_tgkill
# error "dirtytrack: SYS_tgkill missing from <sys/syscall.h>"
#endif
/* siginfo's si_code for a signal sent by kill/tgkill/sigqueue: SI_USER 0,
 * SI_QUEUE -1, SI_TKILL -6 (include/uapi/asm-generic/siginfo.h). Anything
 * <= 0 came from a process, not from the kernel or the CPU. */

/* ---- the register file of a stopped thread, per architecture ------------- *
 * inject.pxi sees only these accessors. To add an architecture, give it:
 * dt_regs (what PTRACE_GETREGSET(NT_PRSTATUS) fills), its syscall instruction
 * bytes, and the five functions below. aarch64 note: the syscall number of an
 * interrupted syscall is not in the general registers there; making the kernel
 * skip its restart logic needs PTRACE_SETREGSET(NT_ARM_SYSTEM_CALL) = -1, the
 * equivalent of orig_rax = -1 below. */
#if defined(__x86_64__)
typedef struct user_regs_struct dt_regs;      /* <sys/user.h>, = struct pt_regs order */
static const unsigned char dt_syscall_insn[2] = {0x0f, 0x05};   /* "syscall" */
# define DT_SYSCALL_INSN_LEN 2
# define DT_USER64_CS 0x33     /* __USER_CS, arch/x86/include/asm/segment.h; ia32 is 0x23 */

static inline uint64_t dt_pc(const dt_regs *r) { return r->rip; }
/* Return value of the syscall that just ran (or -ERESTART* of one that was interrupted). */
static inline long dt_syscall_ret(const dt_regs *r) { return (long)r->rax; }
/* Number of the syscall the thread was stopped in, or -1 if it was in user code. */
static inline long dt_interrupted_nr(const dt_regs *r) { return (long)r->orig_rax; }
/* 64-bit task? An ia32 task would need int 0x80 and other numbers: refused. */
static inline int dt_is_native(const dt_regs *r) { return r->cs == DT_USER64_CS; }
/* Make r execute syscall nr(a0, a1) at pc. orig_rax = -1 tells the kernel's
 * signal-return path (arch_do_signal_or_restart, arch/x86/kernel/signal.c)
 * that this is no interrupted syscall to restart: it must not rewrite rax/rip. */
static inline void dt_set_syscall(dt_regs *r, uint64_t pc, long nr, uint64_t a0, uint64_t a1)
{
	r->rip = pc;
	r->rax = (unsigned long long)nr;
	r->orig_rax = (unsigned long long)-1;
	r->rdi = a0;
	r->rsi = a1;
}
#else
# error "dirtytrack: inject.pxi has no register accessors for this architecture (see above)"
#endif

/* The layouts above are ABI: catch a typo at compile time, not in the field. */
_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg is 12 u64");
_Static_assert(sizeof(struct page_region) == 24, "page_region is 3 u64");
_Static_assert(sizeof(struct procmap_query) == 104, "procmap_query layout");

#endif /* DIRTYTRACK_KERNEL_ABI_H */
