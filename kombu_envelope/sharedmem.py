"""Memory and locks shared by a process and every process it forks. Standard library only.

The memory is one anonymous ``MAP_SHARED`` mapping: every process forked
after it is made sees the same pages, and nothing ever reaches a file. The
locks are POSIX record locks (``fcntl.lockf``) on byte ranges of a memfd
that holds no data: they belong to a process, are not inherited by forks,
and the kernel releases them when their holder dies, even by SIGKILL. (A
``flock`` on an inherited descriptor would be shared with the children and
exclude nobody.) Record locks do not exclude threads of one process, so each
range also has a ``threading.Lock``, replaced in a forked child because
another thread may have held it at fork time.

Where ``fcntl`` or ``os.memfd_create`` is missing (not Linux), locks fall
back to an unlinked temporary file, and without ``fcntl`` to threads only.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no fork, threads only)
    fcntl = None  # type: ignore[assignment]

__all__ = ["SharedRegion"]

# Linux reports EDEADLK when process A holds a range and waits for one held
# by process B while B waits for A's; with threads this can be a false
# alarm (the range B waits for is held by another thread of A that will
# release it), so waiting is retried after a short pause.
_DEADLOCK_PAUSE = 0.001
_BUSY = (errno.EACCES, errno.EAGAIN)


class SharedRegion:
    """``size`` bytes of memory and ``locks`` byte-range locks, shared with future forks of this process."""

    def __init__(self, size: int, locks: int) -> None:
        self.size = size
        self.buf = mmap.mmap(-1, size)  # anonymous and MAP_SHARED: one copy for parent and children
        self.locks = locks
        self._fd = _lock_file() if fcntl is not None else -1
        self._fd_identity = os.fstat(self._fd)[1:3] if self._fd >= 0 else None
        if self._fd >= 0:
            weakref.finalize(self, os.close, self._fd)
        self._thread_locks: dict[int, threading.Lock] = {}

    def after_fork_in_child(self) -> None:
        """Fresh thread locks: one may have been held by a thread that does not exist in the child."""
        self._thread_locks = {}

    @contextmanager
    def hold(self, index: int) -> Iterator[None]:
        """Hold lock ``index`` against every thread and process sharing the region; wait for it."""
        thread_lock = self._thread_locks.get(index)
        if thread_lock is None:
            thread_lock = self._thread_locks.setdefault(index, threading.Lock())
        with thread_lock:
            self._lockf_wait(index)
            try:
                yield
            finally:
                self.unlock(index)

    def try_lock(self, index: int) -> bool:
        """Take lock ``index`` for this process if no other process has it; don't wait.

        Only record-locks the range (no thread lock): any thread of this
        process may ``unlock`` it. Held until then or until this process
        dies, so it also marks a process as alive. A range this process
        already holds is granted again: guard it against own threads.
        """
        if fcntl is None:
            return True
        try:
            self._lockf(fcntl.LOCK_EX | fcntl.LOCK_NB, index)
        except OSError as exc:
            if exc.errno in _BUSY:
                return False
            raise
        return True

    def unlock(self, index: int) -> None:
        if fcntl is not None:
            self._lockf(fcntl.LOCK_UN, index)

    def held_by_other_process(self, index: int) -> bool:
        """True if another, live process holds lock ``index`` (never ask about one this process holds)."""
        if not self.try_lock(index):
            return True
        self.unlock(index)
        return False

    def _lockf_wait(self, index: int) -> None:
        if fcntl is None:
            return
        while True:
            try:
                self._lockf(fcntl.LOCK_EX, index)
                return
            except OSError as exc:
                if exc.errno != errno.EDEADLK:
                    raise
            time.sleep(_DEADLOCK_PAUSE)

    def _lockf(self, command: int, index: int) -> None:
        if self._fd < 0:
            return
        if os.fstat(self._fd)[1:3] != self._fd_identity:
            # Something closed our descriptor and its number now names another
            # file (a daemonizer closing "all" fds); locking it would be wrong.
            raise OSError(errno.EBADF, "the kombu-envelope lock file descriptor was closed by other code")
        fcntl.lockf(self._fd, command, 1, index, os.SEEK_SET)


def _lock_file() -> int:
    """A descriptor for a file that only ever carries locks: a memfd, else an unlinked temporary file."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            return memfd_create("kombu-envelope-locks", os.MFD_CLOEXEC)
        except OSError:
            pass
    with tempfile.TemporaryFile() as handle:
        fd = os.dup(handle.fileno())
    os.set_inheritable(fd, False)
    return fd
