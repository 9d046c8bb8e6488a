# Cython view of kernel_abi.h: the only place the extension learns kernel ABI.
# Declares just the fields and constants dirtytrack uses.
from libc.stdint cimport uint64_t, uint32_t

cdef extern from "kernel_abi.h" nogil:
    long SYS_userfaultfd
    long SYS_pidfd_open
    long SYS_pidfd_getfd

    # userfaultfd(2), /dev/userfaultfd
    int UFFD_USER_MODE_ONLY
    unsigned long USERFAULTFD_IOC_NEW
    uint64_t UFFD_API

    struct uffdio_api:
        uint64_t api
        uint64_t features
        uint64_t ioctls

    struct uffdio_range:
        uint64_t start
        uint64_t len

    struct uffdio_register:
        uffdio_range range
        uint64_t mode
        uint64_t ioctls

    struct uffdio_writeprotect:
        uffdio_range range
        uint64_t mode

    unsigned long UFFDIO_API
    unsigned long UFFDIO_REGISTER
    unsigned long UFFDIO_UNREGISTER
    unsigned long UFFDIO_WRITEPROTECT
    uint64_t UFFDIO_REGISTER_MODE_WP
    uint64_t UFFDIO_WRITEPROTECT_MODE_WP
    uint64_t UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    uint64_t UFFD_FEATURE_WP_UNPOPULATED
    uint64_t UFFD_FEATURE_WP_ASYNC

    # PAGEMAP_SCAN on /proc/PID/pagemap
    struct page_region:
        uint64_t start
        uint64_t end
        uint64_t categories

    struct pm_scan_arg:
        uint64_t size
        uint64_t flags
        uint64_t start
        uint64_t end
        uint64_t walk_end
        uint64_t vec
        uint64_t vec_len
        uint64_t max_pages
        uint64_t category_inverted
        uint64_t category_mask
        uint64_t category_anyof_mask
        uint64_t return_mask

    unsigned long PAGEMAP_SCAN
    uint64_t PAGE_IS_WPALLOWED
    uint64_t PAGE_IS_WRITTEN
    uint64_t PAGE_IS_FILE
    uint64_t PAGE_IS_PRESENT
    uint64_t PAGE_IS_SWAPPED
    uint64_t PAGE_IS_PFNZERO
    uint64_t PAGE_IS_HUGE
    uint64_t PAGE_IS_SOFT_DIRTY
    uint64_t PM_SCAN_WP_MATCHING
    uint64_t PM_SCAN_CHECK_WPASYNC

    # PROCMAP_QUERY on /proc/PID/maps
    struct procmap_query:
        uint64_t size
        uint64_t query_flags
        uint64_t query_addr
        uint64_t vma_start
        uint64_t vma_end
        uint64_t vma_flags
        uint64_t vma_page_size
        uint32_t vma_name_size
        uint32_t build_id_size

    unsigned long PROCMAP_QUERY
    uint64_t PROCMAP_QUERY_COVERING_OR_NEXT_VMA

# glibc declares the request as unsigned long; PAGEMAP_SCAN does not fit an int.
cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

# ptrace(2), pidfd, process_vm_readv: injecting userfaultfd() into another
# process (inject.pxi). Requests go through syscall(SYS_ptrace, ...) so that
# glibc's PEEK* return-value convention never applies.
cdef extern from "kernel_abi.h" nogil:
    long SYS_ptrace
    long SYS_close
    long SYS_tgkill
    long PTRACE_SEIZE
    long PTRACE_INTERRUPT
    long PTRACE_DETACH
    long PTRACE_CONT
    long PTRACE_SINGLESTEP
    long PTRACE_GETREGSET
    long PTRACE_SETREGSET
    long PTRACE_GETSIGINFO
    long PTRACE_SETSIGINFO
    long PTRACE_GETSIGMASK
    long PTRACE_SETSIGMASK
    int PTRACE_EVENT_STOP
    int NT_PRSTATUS
    int __WALL
    int DT_SYSCALL_INSN_LEN

    # The register file of a stopped thread: opaque, used through the
    # per-architecture accessors of kernel_abi.h.
    ctypedef struct dt_regs:
        pass
    const unsigned char dt_syscall_insn[]
    uint64_t dt_pc(const dt_regs *r)
    long dt_syscall_ret(const dt_regs *r)
    long dt_interrupted_nr(const dt_regs *r)
    int dt_is_native(const dt_regs *r)
    void dt_set_syscall(dt_regs *r, uint64_t pc, long nr, uint64_t a0, uint64_t a1)

cdef extern from "<sys/uio.h>" nogil:
    ctypedef long ssize_t
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t process_vm_readv(int pid, const iovec *local_iov, unsigned long liovcnt,
                             const iovec *remote_iov, unsigned long riovcnt,
                             unsigned long flags)

cdef extern from "<signal.h>" nogil:
    ctypedef struct siginfo_t:
        int si_signo
        int si_errno
        int si_code
        int si_pid
        int si_status
    int SIGTRAP
    int SIGSTOP
    int SIGSYS

cdef extern from "<sys/wait.h>" nogil:
    int c_waitpid "waitpid"(int pid, int *status, int options)
    bint WIFSTOPPED(int status)
    bint WIFEXITED(int status)
    bint WIFSIGNALED(int status)
    int WSTOPSIG(int status)
    int WEXITSTATUS(int status)
    int WTERMSIG(int status)
    int WNOHANG
    # waitid(2) with WNOWAIT: look at a state change without consuming it.
    int waitid(int idtype, int id, siginfo_t *infop, int options)
    int P_PID
    int WEXITED
    int WSTOPPED
    int WNOWAIT
    int CLD_EXITED
    int CLD_KILLED
    int CLD_DUMPED
