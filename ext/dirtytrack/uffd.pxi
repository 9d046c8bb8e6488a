# uffd.pxi - getting a userfaultfd and doing its handshake.
# Kept apart from the tracker so that an fd adopted from another process
# (pidfd_getfd, SCM_RIGHTS) goes through the same handshake as our own.

# What the tracker asks the kernel for. WP_UNPOPULATED makes never-touched
# pages write-protected too, so their first write is caught; WP_HUGETLBFS_SHMEM
# lets shmem and hugetlb mappings be protected on kernels that gate it.
cdef uint64_t WANTED_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
cdef uint64_t OPTIONAL_FEATURES = UFFD_FEATURE_WP_HUGETLBFS_SHMEM


cdef int uffd_open(bint allow_user_mode_only, int *how) noexcept nogil:
    """A new userfaultfd for the calling process, or -errno.

    Tries, in order: the syscall; the syscall with UFFD_USER_MODE_ONLY (what
    vm.unprivileged_userfaultfd=0 still allows without CAP_SYS_PTRACE; async
    write-protect still works since kernel-mode writes fault like any other);
    /dev/userfaultfd. `how` says which one worked: 0, 1, 2.
    """
    cdef int flags = O_CLOEXEC | O_NONBLOCK
    cdef int fd = <int>syscall(SYS_userfaultfd, flags)
    cdef int first_errno
    how[0] = 0
    if fd >= 0:
        return fd
    first_errno = errno
    if first_errno == ENOSYS:
        return -ENOSYS
    if allow_user_mode_only:
        fd = <int>syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY)
        if fd >= 0:
            how[0] = 1
            return fd
    cdef int dev = c_open("/dev/userfaultfd", O_RDWR | O_CLOEXEC)
    if dev >= 0:
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        close(dev)
        if fd >= 0:
            how[0] = 2
            return fd
    return -first_errno


cdef int uffd_handshake(int fd, uint64_t features, uint64_t *granted) noexcept nogil:
    cdef uffdio_api api
    memset(&api, 0, sizeof(api))
    api.api = UFFD_API
    api.features = features
    if ioctl(fd, UFFDIO_API, &api) < 0:
        return -errno
    granted[0] = api.features
    return 0


cdef int uffd_query_features(uint64_t *features) noexcept nogil:
    """What this kernel's userfaultfd offers (UFFDIO_API with features=0 on a
    throwaway fd: the handshake can be done only once per fd). 0 or -errno."""
    cdef int how
    cdef int fd = uffd_open(True, &how)
    cdef int rc
    if fd < 0:
        return fd
    rc = uffd_handshake(fd, 0, features)
    close(fd)
    return rc


def query_features():
    """The userfaultfd features this kernel offers, as a bit mask."""
    cdef uint64_t features = 0
    cdef int rc
    with nogil:
        rc = uffd_query_features(&features)
    if rc < 0:
        raise error_for("userfaultfd", -rc)
    return features


def open_userfaultfd(bint allow_user_mode_only=True):
    """Create a userfaultfd for this process: returns (fd, how) where how is
    "syscall", "user-mode-only" or "/dev/userfaultfd". The caller owns fd."""
    cdef int how = 0
    cdef int fd
    with nogil:
        fd = uffd_open(allow_user_mode_only, &how)
    if fd < 0:
        raise error_for("userfaultfd", -fd)
    return fd, ("syscall", "user-mode-only", "/dev/userfaultfd")[how]
