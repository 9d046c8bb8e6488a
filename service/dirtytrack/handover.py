"""Cooperative hand-over of a userfaultfd over a Unix socket (SCM_RIGHTS).

A program that agrees to be tracked creates its own userfaultfd - the only
step that must run inside it - and sends it to the tracker, which then does
everything else from outside (``Tracker(pid, uffd=fd)``). No ptrace, no
CAP_SYS_PTRACE. The sender must not do the UFFDIO_API handshake: the
receiving Tracker does it, asking for the features it needs.

Wire format: one message whose bytes are ``b"dirtytrack-uffd 1 ok <how>"`` with
the fd attached, or ``b"dirtytrack-uffd 1 error <errno>"`` without one when the
sender could not create it, so the receiver raises the sender's real cause.
docs/handover.md shows the same in C.
"""
from __future__ import annotations

import array
import errno as _errno
import os
import socket
import struct

from dirtytrack.errors import DirtytrackError, error_for

__all__ = ["send_userfaultfd", "receive_userfaultfd", "MAGIC"]

MAGIC = b"dirtytrack-uffd 1"
_MAX_MESSAGE = 128


def send_userfaultfd(sock: socket.socket, *, allow_user_mode_only: bool = True) -> None:
    """Create a userfaultfd for the calling process and send it over `sock`.

    The socket must be a connected AF_UNIX socket. Our copy of the fd is
    closed once sent: whoever receives it holds the tracking. If the
    userfaultfd cannot be created, the receiver is told why and this raises too.
    """
    from dirtytrack._core import open_userfaultfd

    try:
        fd, how = open_userfaultfd(allow_user_mode_only)
    except OSError as exc:
        code = exc.errno or _errno.EIO
        sock.sendall(MAGIC + b" error %d" % code)
        raise
    try:
        socket.send_fds(sock, [MAGIC + b" ok " + how.encode()], [fd])
    finally:
        os.close(fd)


def _peer_pid(sock: socket.socket) -> int:
    # struct ucred { pid_t pid; uid_t uid; gid_t gid; } (socket(7), SO_PEERCRED)
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def receive_userfaultfd(sock: socket.socket) -> tuple[int, int]:
    """Receive a userfaultfd sent by send_userfaultfd (or the C equivalent).

    Returns ``(fd, pid)``: the fd is ours to own; pid is the sender's, from
    SO_PEERCRED - the process that connected (or, for a socketpair, created)
    the socket. That must be the process that created the userfaultfd, since
    its address space is the one tracked: a sender that forked after
    connecting must pass its pid to Tracker itself.
    """
    # Room for 4 fds so that a confused peer's extras are received and closed,
    # not left in flight; CLOEXEC so that they never leak into a child.
    msg, ancdata, flags, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(4 * 4),
                                          socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    try:
        if flags & socket.MSG_CTRUNC:
            raise DirtytrackError("the userfaultfd message carried more descriptors than "
                                  "expected (control data truncated): is the peer a "
                                  "dirtytrack sender?", _errno.EPROTO)
        if not msg:
            raise DirtytrackError("the peer closed the socket before sending its userfaultfd",
                                  _errno.ECONNRESET)
        if not msg.startswith(MAGIC):
            raise DirtytrackError(f"unexpected message {msg[:40]!r} instead of a userfaultfd "
                                  "hand-over: is the peer a dirtytrack sender?", _errno.EPROTO)
        words = msg[len(MAGIC):].split()
        if words[:1] == [b"error"]:
            code = int(words[1]) if len(words) > 1 and words[1].isdigit() else _errno.EIO
            raise error_for("userfaultfd", code)
        if len(fds) != 1:
            raise DirtytrackError(f"the hand-over message carried {len(fds)} descriptors "
                                  "instead of one userfaultfd", _errno.EPROTO)
        link = os.readlink(f"/proc/self/fd/{fds[0]}")
        if link != "anon_inode:[userfaultfd]":
            raise DirtytrackError(f"the descriptor received is {link}, not a userfaultfd",
                                  _errno.EPROTO)
        fd, pid = fds.pop(), _peer_pid(sock)
        return fd, pid
    finally:
        for extra in fds:
            os.close(extra)
