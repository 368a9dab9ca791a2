"""Write-behind: file writes and sha256 on other threads while this one computes.

Converting a big model is three kinds of work of about the same size: numpy
arithmetic (fold, MPS layouts), copying bytes into the page cache (``write``)
and hashing the Metal files (sha256).  All three release the GIL, so they can
run side by side: :class:`WriteBehind` runs the writes on one worker thread
and the hashing on another, each in the order asked for, while the caller
goes on computing the next block.

* Per worker, at most ``max_bytes`` (and ``max_jobs`` jobs) are queued at a
  time; a caller that gets ahead waits, so memory stays bounded.
* Every buffer handed over is kept referenced until used: hand over arrays or
  memoryviews that nobody modifies afterwards.
* A failed write is reported as an :class:`ExportError` naming the file it
  was for, at the next call (or at :meth:`wait` / leaving the ``with``);
  later writes are skipped.  Files are closed by :meth:`close_file` in order
  after their writes, also after an error or interruption.
* :meth:`hash` feeds a hashlib object; :meth:`when_hashed` runs a function
  once everything queued for hashing before it is done (to read the digest).
* Leaving the ``with`` block normally waits for everything; leaving it with an
  exception (Ctrl-C included) drops the jobs not yet started (closing files
  still happens) and joins the workers, so the caller can remove its output.
* ``WriteBehind(enabled=False)`` does everything in the calling thread at once:
  small conversions do not pay for threads.
* Inside the ``with`` block Python's thread switch interval is 0.5 ms instead
  of 5 ms, so a worker whose write or update has returned does not wait long
  for the GIL (measured on the VGG16 bench: median wall -8%).
"""
from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

from ..errors import ExportError


class _Worker:
    """One thread running queued jobs in order.  A job that raises does not stop
    the thread: the exception goes to ``on_error`` and the next job runs."""

    def __init__(self, name: str, max_bytes: int, max_jobs: int, on_error):
        self.name, self.max_bytes, self.max_jobs = name, max_bytes, max_jobs
        self.on_error = on_error
        self.jobs: collections.deque = collections.deque()
        self.cv = threading.Condition()
        self.queued_bytes = 0
        self.busy = False
        self.abort = False
        self.stop = False
        self.thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], None], nbytes: int, always: bool, failed) -> None:
        """Queue ``fn``; ``always``: run it even after an abort or error (closing a file).
        ``failed()`` tells whether to stop waiting for room (an error to report)."""
        with self.cv:
            while (self.jobs and (self.queued_bytes + nbytes > self.max_bytes
                                  or len(self.jobs) >= self.max_jobs) and not failed()):
                self.cv.wait()
            self.jobs.append((fn, nbytes, always))
            self.queued_bytes += nbytes
            self.cv.notify_all()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def idle(self) -> None:
        with self.cv:
            while self.jobs or self.busy:
                self.cv.wait()

    def set_abort(self) -> None:
        with self.cv:
            self.abort = True
            self.cv.notify_all()

    def shutdown(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.jobs and not self.stop:
                    self.cv.wait()
                if not self.jobs:
                    return
                fn, nbytes, always = self.jobs.popleft()
                self.busy = True
                skip = self.abort and not always
            try:
                if not skip:
                    fn()
            except BaseException as e:          # never leave the caller waiting for us
                self.on_error(e)
            finally:
                del fn
                with self.cv:
                    self.queued_bytes -= nbytes
                    self.busy = False
                    self.cv.notify_all()


SWITCH_INTERVAL = 0.0005     # s; Python's default 5 ms leaves a worker waiting for the GIL


class WriteBehind:
    def __init__(self, enabled: bool = True, max_bytes: int = 64 << 20, max_jobs: int = 64):
        self.enabled = enabled
        self._switch = None
        self._writes = _Worker("caffe2metal-write", max_bytes, max_jobs, self._unexpected)
        self._hashes = _Worker("caffe2metal-sha256", max_bytes, max_jobs, self._unexpected)
        self._error: BaseException | None = None
        self._aborted = False

    # ------------------------------------------------------------ caller side

    def write(self, f: BinaryIO, data, name=None) -> None:
        """Write ``data`` (bytes-like, kept alive until written) to ``f``; ``name``
        is the file named in an error (default: ``f.name``)."""
        name = getattr(f, "name", None) if name is None else name
        self._submit(self._writes, lambda: self._do_write(f, data, name), _nbytes(data))

    def close_file(self, f: BinaryIO, name=None) -> None:
        """Close ``f`` once its queued writes are done."""
        name = getattr(f, "name", None) if name is None else name
        self._submit(self._writes, lambda: self._do_close(f, name), 0, always=True)

    def hash(self, digest, data) -> None:
        """``digest.update(data)``, in order with the other updates."""
        self._submit(self._hashes, lambda: digest.update(data), _nbytes(data))

    def when_hashed(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the hashing queued so far is done."""
        self._submit(self._hashes, fn, 0)

    def wait(self) -> None:
        """Return when every queued job is done; raise the first write error."""
        self._writes.idle()
        self._hashes.idle()
        self._raise()

    def abort(self) -> None:
        """Drop the jobs not yet started (files are still closed); return when idle."""
        self._aborted = True
        for w in (self._writes, self._hashes):
            w.set_abort()
        self._writes.idle()
        self._hashes.idle()

    def __enter__(self):
        if self.enabled:            # workers get the GIL back soon after each write/update
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.wait()
            else:
                self.abort()
        finally:
            self._writes.shutdown()
            self._hashes.shutdown()
            if self._switch is not None:
                sys.setswitchinterval(self._switch)
                self._switch = None
        return False

    # ------------------------------------------------------------ internals

    def _submit(self, worker: _Worker, fn, nbytes: int, always: bool = False) -> None:
        if not self.enabled:
            if always or (self._error is None and not self._aborted):
                fn()
            self._raise()
            return
        if not always:                             # (a close is queued whatever happened)
            self._raise()
        worker.submit(fn, nbytes, always, lambda: self._error is not None)
        self._raise()

    def _do_write(self, f, data, name) -> None:
        if self._error is not None:
            return
        try:
            f.write(data)
        except (OSError, ValueError) as e:        # ValueError: closed under us
            self._fail(name, e)

    def _do_close(self, f, name) -> None:
        try:
            f.close()
        except OSError as e:
            if not self._aborted:
                self._fail(name, e)

    def _fail(self, name, e: Exception) -> None:
        if self._error is None:
            self._error = ExportError(f"cannot write: {getattr(e, 'strerror', None) or e}",
                                      file=name)
        self._writes.set_abort()                   # nothing more is written; closes still are

    def _unexpected(self, e: BaseException) -> None:
        """A job raised something other than a write error: re-raised in the caller."""
        if self._error is None:
            self._error = e
        self._writes.set_abort()
        self._hashes.set_abort()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _nbytes(data) -> int:
    return memoryview(data).nbytes
