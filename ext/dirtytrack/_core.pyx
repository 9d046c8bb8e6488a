# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""dirtytrack._core - the compiled tracker: userfaultfd async write-protect,
PAGEMAP_SCAN, and the dirty-page sets they fill.

One extension module built from one file per concern (uvloop's layout):
  bits.pxi      word-level bitmap primitives
  runs.pxi      RunList: what a scan returns
  dirtyset.pxi  DirtySet: bitmap, merge, runs, wire encoding
  uffd.pxi      creating a userfaultfd and its handshake
  tracker.pxi   Tracker / Region: register, protect, scan, lost-tracking
  inject.pxi    a userfaultfd made inside another process (ptrace), pidfd
The kernel ABI itself lives in kernel_abi.h / kernel.pxd.
"""
cimport cython
from libc.errno cimport errno, EAGAIN, EINVAL, EIO, ENOENT, ENOMEM, ENOSYS, ENOTTY, EPERM
from libc.stdint cimport uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.fcntl cimport open as c_open, O_CLOEXEC, O_NONBLOCK, O_RDWR
from posix.unistd cimport close, sysconf, _SC_PAGESIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_ANY_CONTIGUOUS

from dirtytrack.kernel cimport *

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

import os

from dirtytrack.maps import first_gap, read_maps
from dirtytrack.errors import (DirtytrackError, InvalidRange, KernelUnsupported,
                               TrackerClosed, error_for)

include "bits.pxi"
include "runs.pxi"
include "dirtyset.pxi"
include "uffd.pxi"
include "tracker.pxi"
include "inject.pxi"

PAGE_SIZE = sysconf(_SC_PAGESIZE)

FEATURE_WP_ASYNC = UFFD_FEATURE_WP_ASYNC
FEATURE_WP_UNPOPULATED = UFFD_FEATURE_WP_UNPOPULATED
FEATURE_WP_HUGETLBFS_SHMEM = UFFD_FEATURE_WP_HUGETLBFS_SHMEM

# PAGEMAP_SCAN flags and page categories, for pagemap_scan() callers.
SCAN_WP_MATCHING = PM_SCAN_WP_MATCHING
SCAN_CHECK_WPASYNC = PM_SCAN_CHECK_WPASYNC
CATEGORY_WPALLOWED = PAGE_IS_WPALLOWED
CATEGORY_WRITTEN = PAGE_IS_WRITTEN
CATEGORY_FILE = PAGE_IS_FILE
CATEGORY_PRESENT = PAGE_IS_PRESENT
CATEGORY_SWAPPED = PAGE_IS_SWAPPED
CATEGORY_PFNZERO = PAGE_IS_PFNZERO
CATEGORY_HUGE = PAGE_IS_HUGE
CATEGORY_SOFT_DIRTY = PAGE_IS_SOFT_DIRTY


def writable_span(obj):
    """(address, length) of a writable, contiguous buffer. The caller must
    keep an export of `obj` (a memoryview) alive while it uses the address."""
    cdef Py_buffer view
    try:
        PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    except BufferError as exc:
        raise InvalidRange(f"cannot track this {type(obj).__name__}: {exc} "
                           "(a writable, contiguous buffer is needed)") from exc
    try:
        return <uintptr_t>view.buf, view.len
    finally:
        PyBuffer_Release(&view)
