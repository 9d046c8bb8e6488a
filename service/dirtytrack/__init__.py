"""dirtytrack: which memory pages of running processes were written.

In-process use::

    with dirtytrack.track(buf) as t:
        ...                      # writes happen
        d = t.collect()          # pages written since the previous collect
        d.pages(), d.ranges(), d.count

``Tracker`` is the lower-level object over address ranges; ``DirtySet`` and
``RunList`` hold what a scan found. A set whose ``lost_reason`` is not None
could not be proven complete and holds every page: resend everything.
"""
from dirtytrack._core import PAGE_SIZE, DirtySet, Region, RunList, Tracker
from dirtytrack.errors import (
    DirtytrackError,
    InjectionFailed,
    InvalidRange,
    KernelUnsupported,
    ProcessGone,
    PtraceDenied,
    RangeBusy,
    TrackerClosed,
    UserfaultfdUnavailable,
)
from dirtytrack.process import MappingReport, ProcessDirtySet, ProcessTracker, attach
from dirtytrack.shared import SharedDirtySet, SharedTracker, track_shared
from dirtytrack.track import BufferTracker, track

__version__ = "0.1.0"

__all__ = [
    "PAGE_SIZE",
    "BufferTracker",
    "DirtySet",
    "DirtytrackError",
    "InjectionFailed",
    "InvalidRange",
    "ProcessGone",
    "PtraceDenied",
    "KernelUnsupported",
    "RangeBusy",
    "Region",
    "RunList",
    "Tracker",
    "TrackerClosed",
    "UserfaultfdUnavailable",
    "track",
    "attach",
    "ProcessTracker",
    "ProcessDirtySet",
    "MappingReport",
    "track_shared",
    "SharedTracker",
    "SharedDirtySet",
]
