"""Write-behind: file writes on a second thread while this one computes the next block.

Converting a big model is two kinds of work of about the same size: numpy
arithmetic (fold, MPS layouts, sha256) and copying bytes into the page cache
(``write``).  Both release the GIL, so with a second core they overlap:
:class:`WriteBehind` runs the writes, in the order they were asked for, on one
worker thread, and the caller goes on computing.

* At most ``max_bytes`` (and ``max_jobs`` writes) are queued at a time; a
  caller that gets ahead waits, so memory stays bounded.
* Every buffer handed over is kept referenced until it is written: hand over
  arrays or memoryviews that nobody modifies afterwards.
* A failed write is reported as an :class:`ExportError` naming the file it
  was for, at the next call (or at :meth:`wait` / leaving the ``with``);
  later writes are skipped.  Files are closed by :meth:`close_file` in order
  after their writes, also after an error or interruption.
* Leaving the ``with`` block normally waits for everything; leaving it with an
  exception (Ctrl-C included) drops the writes not yet started and joins the
  worker, so the caller can remove its output safely.
* ``WriteBehind(enabled=False)`` does everything in the calling thread at once:
  small conversions do not pay for a thread.
"""
from __future__ import annotations

import collections
import threading
from typing import BinaryIO

from .errors import ExportError


class WriteBehind:
    def __init__(self, enabled: bool = True, max_bytes: int = 64 << 20, max_jobs: int = 64):
        self.enabled = enabled
        self.max_bytes, self.max_jobs = max_bytes, max_jobs
        self._jobs: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._queued_bytes = 0
        self._error: ExportError | None = None
        self._abort = False
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ caller side

    def write(self, f: BinaryIO, data, name=None) -> None:
        """Write ``data`` (bytes-like, kept alive until written) to ``f``; ``name``
        is the file named in an error (default: ``f.name``)."""
        name = getattr(f, "name", None) if name is None else name
        if not self.enabled:
            self._do_write(f, data, name)
            self._raise()
            return
        n = memoryview(data).nbytes
        with self._cv:
            while (self._jobs and (self._queued_bytes + n > self.max_bytes
                                   or len(self._jobs) >= self.max_jobs)
                   and self._error is None):
                self._cv.wait()
            self._raise()
            self._jobs.append(("write", f, data, n, name))
            self._queued_bytes += n
            self._cv.notify_all()
        self._start()

    def close_file(self, f: BinaryIO, name=None) -> None:
        """Close ``f`` once its queued writes are done."""
        name = getattr(f, "name", None) if name is None else name
        if not self.enabled:
            self._do_close(f, name)
            self._raise()
            return
        with self._cv:
            self._jobs.append(("close", f, None, 0, name))
            self._cv.notify_all()
        self._start()

    def wait(self) -> None:
        """Return when every queued job is done; raise the first write error."""
        self._idle()
        self._raise()

    def abort(self) -> None:
        """Drop the writes not yet started (files are still closed); return when idle."""
        with self._cv:
            self._abort = True
            self._cv.notify_all()
        self._idle()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.wait()
            else:
                self.abort()
        finally:
            self._shutdown()
        return False

    # ------------------------------------------------------------ worker side

    _busy = False

    def _idle(self) -> None:
        with self._cv:
            while self._jobs or self._busy:
                self._cv.wait()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="caffe2metal-write",
                                            daemon=True)
            self._thread.start()

    def _shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if not self._jobs:
                    return
                kind, f, data, n, name = self._jobs.popleft()
                self._busy = True
                skip = self._abort or self._error is not None
            try:
                if kind == "close":
                    self._do_close(f, name)
                elif not skip:
                    self._do_write(f, data, name)
            finally:
                del data
                with self._cv:
                    self._queued_bytes -= n
                    self._busy = False
                    self._cv.notify_all()

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
            if not self._abort:
                self._fail(name, e)

    def _fail(self, name, e: Exception) -> None:
        if self._error is None:
            self._error = ExportError(f"cannot write: {getattr(e, 'strerror', None) or e}",
                                      file=name)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
