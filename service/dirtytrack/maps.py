"""A process's mappings (/proc/PID/maps) and which of them dirtytrack tracks.

Default selection, what a live-migration controller needs copied: every
writable private-anonymous mapping (heap, stacks, anonymous mmaps) and every
shared-memory mapping (memfd, shmem, SysV shm, POSIX shm under /dev/shm,
shared anonymous, hugetlb). Everything else is skipped with a reason the
caller can read; name patterns and address ranges add what the default leaves.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

__all__ = ["VMA", "Selection", "parse_maps", "read_maps", "read_maps_bytes"]

# Mappings the kernel provides: never registrable, never the program's data.
SPECIAL = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]")

# Names the kernel gives shared-memory objects in /proc/PID/maps.
SHMEM_PREFIXES = ("/memfd:", "/SYSV", "/dev/shm/", "/dev/zero", "/anon_hugepage",
                  "/dev/hugepages/")


@dataclass(frozen=True)
class VMA:
    """One line of /proc/PID/maps."""
    start: int
    end: int
    perms: str          # e.g. "rw-p"
    offset: int
    dev: str            # "major:minor"
    inode: int
    name: str           # path, [heap], [stack], [anon:...], or ""

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def length(self) -> int:
        return self.end - self.start

    def kind(self) -> tuple[str | None, str]:
        """(kind, why): kind is "anon" or "shmem" when the default tracks it,
        None with the reason it does not."""
        name = self.name
        if name in SPECIAL:
            return None, f"{name} is a kernel-provided special mapping"
        if not self.writable:
            return None, ("not writable (read-only or PROT_NONE); if it becomes writable "
                          "it is picked up then")
        if name.startswith(SHMEM_PREFIXES):
            return "shmem", "shared memory"
        if self.inode == 0 and (name == "" or name in ("[heap]", "[stack]")
                                or name.startswith(("[anon:", "[stack:", "[anon_shmem:"))):
            return ("shmem" if self.shared else "anon"), "anonymous memory"
        if self.shared:
            return None, ("shared file mapping: writes through write(2) to the file are "
                          "invisible to tracking; select it by name to track it anyway")
        return None, ("private file mapping (program or library data); select it by "
                      "name to track it")


def parse_maps(text: str) -> list[VMA]:
    vmas = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        lo, _, hi = fields[0].partition("-")
        vmas.append(VMA(int(lo, 16), int(hi, 16), fields[1], int(fields[2], 16), fields[3],
                        int(fields[4]), fields[5].strip() if len(fields) > 5 else ""))
    return vmas


def read_maps_bytes(fd: int) -> bytes:
    """The text of /proc/PID/maps through an fd opened while the process was
    pinned (so a recycled PID can never substitute another process's mappings)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_maps(fd: int) -> list[VMA]:
    """Parse /proc/PID/maps through a pinned fd (see read_maps_bytes)."""
    return parse_maps(read_maps_bytes(fd).decode("utf-8", "surrogateescape"))


def first_gap(vmas: list[VMA], start: int, end: int) -> int | None:
    """The first address of [start, end) that no VMA maps, or None if it is
    wholly mapped (splits by mprotect are fine). `vmas` in address order."""
    pos = start
    for vma in vmas:
        if vma.end <= pos:
            continue
        if vma.start > pos:
            return pos
        pos = vma.end
        if pos >= end:
            return None
    return pos if pos < end else None


@dataclass(frozen=True)
class Selection:
    """What to track in a process.

    default: the writable anonymous and shared-memory mappings (see module doc).
    names:   glob patterns matched against mapping names ("/memfd:guest*",
             "[heap]", "/var/lib/app/*.dat"): those writable mappings too.
    ranges:  (start, end) address ranges: exactly those parts of any mapping.
    files:   (dev, inode) pairs as /proc/PID/maps shows them: every writable
             mapping of those files (see dirtytrack.shared).
    """
    default: bool = True
    names: tuple[str, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()
    files: tuple[tuple[str, int], ...] = ()    # (dev "maj:min", inode): every writable mapping of these

    def pick(self, vmas: list[VMA]) -> tuple[list[tuple[int, int, VMA]], list[tuple[VMA, str]]]:
        """The (start, end, vma) pieces to track, and (vma, reason) skipped."""
        chosen, skipped = [], []
        for vma in vmas:
            kind, why = vma.kind()
            named = any(fnmatch.fnmatchcase(vma.name, pattern) for pattern in self.names) or (
                vma.inode != 0 and (vma.dev, vma.inode) in self.files)
            if self.ranges:
                pieces = [(max(lo, vma.start), min(hi, vma.end)) for lo, hi in self.ranges
                          if lo < vma.end and vma.start < hi]
            else:
                pieces = []
            if (self.default and kind) or (named and vma.writable and vma.name not in SPECIAL):
                chosen.append((vma.start, vma.end, vma))
            elif pieces and vma.name not in SPECIAL:
                chosen.extend((lo, hi, vma) for lo, hi in pieces)
            else:
                skipped.append((vma, why if kind is None else "not selected"))
        return chosen, skipped


def file_identity(path: str) -> tuple[str, int]:
    """(dev, inode) of a file as /proc/PID/maps writes them ("%02x:%02x")."""
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", st.st_ino
