"""
File locks that die with their process: two runs must not write one --out_dir, and two processes
must not build one token store at the same time.

An flock() on an open file is released by the kernel when the process exits, however it exits
(SIGKILL included), so a killed run leaves no stale lock behind and resumes at once. Where fcntl
does not exist (Windows), or the filesystem has no flock (some network and parallel filesystems),
the locks do nothing and say so once: a shared-disk multi-node run then relies on its nodes
building the token stores before the run (or each having its own --cache_dir).
"""

import errno
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
_warned = False


class Busy(Exception):
    """The lock is held by another process; the message names its pid when the file tells it."""


class FileLock:
    """Lock `path` (created if missing) for this process from construction until close() or the end
    of a with-statement; wait=False raises Busy instead of waiting for another holder, and a wait
    says whom it waits for."""

    def __init__(self, path, wait=True):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+")
        try:
            self._lock(wait)
        except BaseException:
            self.file.close()
            raise
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def _lock(self, wait):
        global _warned
        if fcntl is None:
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip()
            busy = f"held by process {holder}" if holder else "held by another process"
            if not wait:
                raise Busy(busy) from None
            print(f"{self.file.name}: {busy}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            if not _warned:
                print(f"warning: {self.file.name}: this filesystem has no file locks ({e.strerror}); going on "
                      "without them", file=sys.stderr)
                _warned = True

    def close(self):
        self.file.close()  # closing the file releases the lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
