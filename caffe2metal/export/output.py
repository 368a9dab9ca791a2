"""All-or-nothing output directories.

Everything is written into a fresh sibling of OUT; only when the whole
conversion has succeeded does it take OUT's place (an existing OUT is moved
aside first and removed after).  A failure or Ctrl-C removes the sibling, so
OUT is never left half-written.

Details:
* an existing OUT is replaced only if it is empty or an earlier output (its
  ``manifest.json`` says ``"format": "caffe2metal"``): ``-o .`` or ``-o ~``
  must never delete a user's files;
* Ctrl-C (and SIGTERM, when nobody else handles it) while the sibling is
  written removes it; during the swap itself both signals are held back and
  delivered right after, so OUT is always either the old or the new tree;
* an ``OSError`` while writing (disk full, permissions, a name the file
  system refuses) becomes an :class:`ExportError` naming the file;
* a run that could not clean up (SIGKILL, power loss, out of memory) leaves
  its hidden ``.OUT.partial-*`` sibling behind, up to the size of the output.
  The sibling is locked (``flock`` on the directory) while its run lives, so
  the next run into the same OUT removes every unlocked one older than a
  minute (and any ``.OUT.old-*`` that old); a conversion still running keeps
  its lock and its directory.  (Without ``fcntl``, or on a file system
  without locks, nothing is removed.)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:                 # Windows: no stale-directory cleanup
    fcntl = None  # type: ignore[assignment]

from ..errors import Caffe2MetalError, ExportError
from ..paths import read_regular

FORMAT = "caffe2metal"          # manifest.json "format" of an output directory we may replace
MAX_MANIFEST_BYTES = 64 << 20   # an earlier output's manifest.json is never bigger
_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                 if s is not None)


def is_output_directory(path: str | os.PathLike) -> bool:
    """True if ``path`` is an empty directory or one that caffe2metal wrote."""
    path = Path(path)
    try:
        if not any(path.iterdir()):
            return True
        # never blocks (a FIFO planted as manifest.json), never reads more than 64 MiB
        data = read_regular(path / "manifest.json", MAX_MANIFEST_BYTES, "manifest.json")
        manifest = json.loads(data)
    except (OSError, ValueError, RecursionError, Caffe2MetalError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM back for the duration; deliver them afterwards."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    old = {}
    for sig in _SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_unwinds():
    """Let SIGTERM unwind the stack (so cleanup runs) when its handler is the default."""
    sig = getattr(signal, "SIGTERM", None)
    if sig is None or not _main_thread() or signal.getsignal(sig) is not signal.SIG_DFL:
        yield
        return
    signal.signal(sig, _terminate)
    try:
        yield
    finally:
        signal.signal(sig, signal.SIG_DFL)


STALE_SECONDS = 60              # a partial directory must be this old to count as abandoned


def _lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on directory ``path`` (None without fcntl)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_abandoned(out: Path) -> list[Path]:
    """Remove the siblings of ``out`` left by runs that died (see the module doc):
    unlocked ``.OUT.partial-*`` and ``.OUT.old-*`` (which a live run removes at once)
    directories older than ``STALE_SECONDS``."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    partial, old = f".{out.name}.partial-", f".{out.name}.old-"
    try:
        candidates = [p for p in out.parent.iterdir()
                      if p.name.startswith(partial) or p.name.startswith(old)]
    except OSError:
        return removed
    now = time.time()
    for p in candidates:
        fd = None
        try:
            st = p.lstat()
            if not stat.S_ISDIR(st.st_mode) or now - st.st_mtime < STALE_SECONDS:
                continue
            if p.name.startswith(partial):
                fd = _lock(p)               # held by a live run: BlockingIOError
        except OSError:
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _remove(path: Path) -> None:
    with _signals_held():
        shutil.rmtree(path, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    """OUT may be replaced only when it is absent, empty or an earlier output of ours."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExportError("exists and is not a directory", file=out)
        if not is_output_directory(out):
            raise ExportError("exists and is not an earlier caffe2metal output (no manifest.json "
                              "of ours): refusing to replace it; remove it or choose another "
                              "output directory", file=out)


def _missing_parents(out: Path) -> list[Path]:
    """The ancestors of ``out`` that do not exist yet, outermost first."""
    missing = []
    for p in out.parents:
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing[::-1]


def _remove_created(created: list[Path]) -> None:
    """Remove the directories this run created for OUT (innermost first), if still empty."""
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


def _make_partial(out: Path, created: list[Path]) -> tuple[Path, int | None]:
    """The hidden sibling to write into, locked while this run lives (see the module doc).
    Nothing is left behind when it cannot be made; ``created`` gets the parent
    directories made for it."""
    try:
        created += _missing_parents(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        _remove_created(created)
        raise ExportError(f"cannot create the output directory: {e.strerror}",
                          file=out) from None
    lock = None
    try:
        try:
            lock = _lock(tmp)
        except OSError:         # no locks on this file system: nothing is
            lock = None         # cleaned up here either (see remove_abandoned)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp's 0700 is not what a user expects
    except OSError as e:
        if lock is not None:
            os.close(lock)
        _remove(tmp)
        _remove_created(created)
        raise ExportError(f"cannot create the output directory: {e.strerror}",
                          file=out) from None
    return tmp, lock


def _swap_in(tmp: Path, out: Path) -> None:
    """``tmp`` takes OUT's place; an existing OUT is moved aside first, removed after."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.replace(out, old / "out")
        except BaseException:
            old.rmdir()
            raise
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "out", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _owner_can_write():
    """While the output is written, the umask never takes the owner's own permissions
    away (``umask 0777`` would make the staging directory unusable, and its files
    impossible to remove).  Group and other bits follow the user's umask.  The umask
    is per process: other threads see the relaxed mask meanwhile."""
    old = os.umask(0o022)
    os.umask(old & 0o077)
    try:
        yield
    finally:
        os.umask(old)


def _outside_view(e: Caffe2MetalError, tmp: Path, out: Path) -> Caffe2MetalError:
    """``e`` naming OUT's final paths instead of the staging directory's (which is gone
    by the time anyone reads the message)."""
    staged, final = str(tmp), str(out)

    def fix(text):
        return text.replace(staged, final) if isinstance(text, str) else text
    if (e.file and staged in e.file) or staged in str(e.message):
        e.file = fix(e.file)
        e.message = fix(e.message)
        e.args = (str(e),)
    return e


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike):
    """Yield a staging directory that takes ``out``'s place when the block succeeds
    (see the module doc); parent directories made for ``out`` are removed again
    when it fails.  Errors name paths under ``out``, never the staging directory."""
    out = Path(out).absolute()
    _check_replaceable(out)
    tmp = lock = None
    created: list[Path] = []
    swapped = False
    with _sigterm_unwinds(), _owner_can_write():
        try:
            with _signals_held():    # a Ctrl-C arrives once tmp is known, so it is removed
                tmp, lock = _make_partial(out, created)
            yield tmp
            with _signals_held():
                _swap_in(tmp, out)
                swapped = True
        except OSError as e:
            if not swapped and tmp is not None:
                _remove(tmp)
                _remove_created(created)
            name = e.filename if e.filename else out
            if tmp is not None:
                name = str(name).replace(str(tmp), str(out))
            raise ExportError(f"cannot write the output: {e.strerror or e}", file=name) from None
        except Caffe2MetalError as e:
            if not swapped and tmp is not None:
                _remove(tmp)
                _remove_created(created)
            if tmp is not None:
                _outside_view(e, tmp, out)
            raise
        except BaseException:
            if not swapped and tmp is not None:
                _remove(tmp)
                _remove_created(created)
            raise
        finally:
            if lock is not None:
                os.close(lock)
