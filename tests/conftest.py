import os
import sys

import pytest

# Helpers shared by the test modules (kmem, groundtruth) live beside them.
sys.path.insert(0, os.path.dirname(__file__))

import kmem  # noqa: E402


@pytest.fixture
def anon():
    """Factory for private anonymous mappings, unmapped after the test."""
    made = []

    def make(npages: int, *, nohuge: bool = True, **kw) -> int:
        addr = kmem.mmap(npages * kmem.PAGE, **kw)
        made.append((addr, npages * kmem.PAGE))
        if nohuge:
            kmem.madvise(addr, npages * kmem.PAGE, kmem.MADV_NOHUGEPAGE)
        return addr

    yield make
    for addr, length in made:
        try:
            kmem.munmap(addr, length)
        except OSError:
            pass


@pytest.fixture
def tracker():
    from dirtytrack import Tracker
    t = Tracker()
    yield t
    t.close()


@pytest.fixture
def hugepages():
    """Reserve 2 MiB huge pages, or skip: the machine cannot provide them."""
    def need(count: int) -> None:
        try:
            kmem.reserve_hugepages(count)
        except OSError as exc:
            pytest.skip(f"no hugetlb pages on this machine: {exc}")
    return need


@pytest.fixture(scope="session")
def target_bin(tmp_path_factory):
    """tests/workloads/target.c, compiled once per session."""
    from workloads.target import target_binary
    return target_binary(str(tmp_path_factory.mktemp("workloads")))


@pytest.fixture
def target(target_bin):
    """Factory of real target processes (workloads/target.c), killed after the test."""
    from workloads.target import Target
    made = []

    def start():
        t = Target(target_bin)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()
