"""Run and sweep folders: exclusive locks, safe names, atomic writes, clean file-system errors.

What a run directory guarantees (the user-facing account is ``docs/runs.md``):

- **One writer.** ``neurosim run``, ``run --resume`` and ``sweep`` hold an exclusive advisory
  lock (:func:`fcntl.flock`) on the lock file :data:`LOCK_NAME` in their folder for their whole
  lifetime. A second writer is refused at once with :class:`~neurosim.errors.FolderLockedError`
  naming the holder's PID. The kernel drops the lock when the holder exits in any way, SIGKILL
  included, so a stale lock file (the holder is dead) is simply taken over.
- **Whole files.** Every file is written to a temporary file beside it, flushed, fsync'ed and
  renamed over the old one (:func:`atomic_write_bytes`), so a reader or a crash sees the old or
  the new content, never a mix. A failed write removes its temporary file.
- **Clean errors.** An ``OSError`` (disk full, permission denied, read-only file system, a file
  where a folder should be) becomes a :class:`~neurosim.errors.ResourceError` naming the path,
  the cause and what to do (:func:`os_error`).
- **Nothing escapes, nothing is replaced.** Default folder names come from :func:`safe_name`
  (one path component); :func:`check_fresh` refuses a folder that already holds files of the
  names a run or sweep would write.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path

from .errors import FolderLockedError, ResourceError, ValidationError

LOCK_NAME = ".neurosim.lock"
TMP_SUFFIX = ".tmp"

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EDQUOT: "your disk quota is used up: free some space or choose another folder",
    errno.EACCES: "permission denied: make it accessible to you (chmod u+rwx) or choose "
                  "another folder",
    errno.EPERM: "operation not permitted: make it accessible to you or choose another folder",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.EEXIST: "a file is in the way where a folder is needed: move it or choose another path",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "a folder is in the way where a file is needed: move it or choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.ENOENT: "a folder on the path does not exist (or was removed meanwhile)",
    errno.EIO: "an input/output error: the disk or the network file system may be failing",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files on this machine",
}


def os_error(exc: OSError, path=None, doing: str = "write it") -> ResourceError:
    """A :class:`ResourceError` for ``exc``, naming the path, the cause and a likely fix."""
    where = str(path if path is not None else (exc.filename or "file system"))
    code = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    cause = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno, "check the path, the permissions and the free space")
    err = ResourceError(where, f"cannot {doing} ({code}: {cause}).", hint + ".")
    err.errno = exc.errno
    return err


# -- names and paths -------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 100


def safe_name(text: str, default: str = "run") -> str:
    """``text`` as one safe path component: runs of characters other than letters, digits and
    ``. _ + -`` become ``-``, leading and trailing ``-`` and ``.`` are dropped (so no ``..``,
    no hidden or absolute name), and a name longer than :data:`MAX_NAME` is cut and given a
    short hash of the original. ``"../esc/x"`` -> ``"esc-x"``; an empty result -> ``default``."""
    s = _UNSAFE.sub("-", str(text)).strip("-.")
    if len(s) > MAX_NAME:
        digest = hashlib.sha256(str(text).encode()).hexdigest()[:8]
        s = s[: MAX_NAME - 9].rstrip("-.") + "-" + digest
    return s or default


def check_inside(path: Path, root: Path, where: str) -> Path:
    """``path`` resolved; refused unless it lies inside ``root`` (symbolic links followed)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p != r and r not in p.parents:
        raise ValidationError(where, f"{str(path)!r} resolves to {str(p)!r}, outside {str(r)!r}.",
                              "give the output folder explicitly with --out.")
    return p


def check_fresh(folder: Path, names, what: str = "run") -> None:
    """Refuse a folder that already holds any of ``names`` (a file, or a non-empty folder): a
    new run never replaces files it did not write. (Their stale ``.tmp`` files are the
    writer's own: remove them first with :func:`remove_stale_tmp`.)"""
    folder = Path(folder)
    found = []
    for n in names:
        p = folder / n
        try:
            if p.is_dir() and not p.is_symlink():
                if any(p.iterdir()):
                    found.append(n + "/")
            elif p.exists() or p.is_symlink():
                found.append(n)
        except OSError as e:
            raise os_error(e, p, "look into it") from None
    if found:
        resume = (f"continue it with: neurosim run --resume {folder}" if what == "run" else
                  f"re-run the same {what} command to continue it")
        raise ValidationError("--out", f"{str(folder)!r} already holds {', '.join(found)}; a new "
                              f"{what} never replaces files it did not write.",
                              f"choose another --out (e.g. a subfolder), or if this is a {what} "
                              f"folder, {resume}.")


def remove_stale_tmp(folder: Path, names) -> list[Path]:
    """Remove the temporary files ``<name>.tmp`` (and ``checkpoints/epoch-*.npz.tmp``) that a
    killed writer left in ``folder``; call it while holding the folder's lock. Returns them."""
    folder = Path(folder)
    stale = [folder / (n + TMP_SUFFIX) for n in names]
    ck = folder / "checkpoints"
    if ck.is_dir():
        stale += list(ck.glob("epoch-*.npz" + TMP_SUFFIX))
    removed = []
    for p in stale:
        try:
            if p.is_file():
                p.unlink()
                removed.append(p)
        except OSError as e:
            raise os_error(e, p, "remove this temporary file left by a killed run") from None
    return removed


_UNIQUE_TMP = re.compile(r"\..+\.(\d+)-[0-9a-f]{8}" + re.escape(TMP_SUFFIX))


def remove_dead_tmp(folder: Path) -> list[Path]:
    """Remove the temporary files of ``atomic_write_bytes(..., unique=True)`` in ``folder``
    whose writer (the PID in the name) no longer runs on this machine. Returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _UNIQUE_TMP.fullmatch(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, but not ours to signal
        return True
    return True


# -- atomic writes ---------------------------------------------------------------------------------
def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. file systems without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. file systems without directory fsync
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path, unique: bool) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
                          if unique else path.name + TMP_SUFFIX)


def atomic_write_bytes(path: Path, data, *, unique: bool = False) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it (``<name>.tmp``, or a
    name unique to this call with ``unique=True`` for writers that hold no lock), fsync, rename,
    fsync of the folder. On any failure (disk full, Ctrl-C, ...) the temporary file is removed;
    an ``OSError`` is raised as a :class:`ResourceError` naming ``path``."""
    def write(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)

    atomic_write_file(path, write, unique=unique)


def atomic_write_text(path: Path, text: str, *, unique: bool = False) -> None:
    atomic_write_bytes(path, text.encode(), unique=unique)


def atomic_write_file(path: Path, write, *, unique: bool = False) -> None:
    """:func:`atomic_write_bytes` for writers that want a file name: ``write(tmp)`` writes the
    temporary file (e.g. ``lambda tmp: fig.savefig(tmp, format="png")``)."""
    path = Path(path)
    tmp = _tmp_path(path, unique)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise os_error(e, path) from None
        raise
    _fsync_dir(path.parent)


# -- the lock --------------------------------------------------------------------------------------
class FolderLock:
    """An exclusive lock on ``folder`` for one run or sweep (see the module docstring).

    ``acquire()`` creates the folder (and missing parents) if needed, then takes a
    non-blocking :func:`fcntl.flock` on ``folder/.neurosim.lock`` and writes the holder's PID,
    host, start time and command into it; another live holder raises
    :class:`FolderLockedError` with its PID. ``release()`` removes the lock file and, when
    ``remove_if_empty`` and nothing else was written, the folders that ``acquire`` created.
    Use it as a context manager."""

    def __init__(self, folder, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self.created: list[Path] = []     # folders acquire() made, outermost first
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_folder(self) -> None:
        missing = []
        p = self.folder
        try:
            while not p.is_dir():
                if p.exists() or p.is_symlink():
                    raise FileExistsError(errno.EEXIST, "a file exists where the folder should be",
                                          str(p))
                missing.append(p)
                if p.parent == p:
                    break
                p = p.parent
            for d in reversed(missing):
                d.mkdir()
                self.created.append(d)
        except OSError as e:
            self._remove_created()
            raise os_error(e, e.filename or self.folder, f"create the {self.what} folder") from None

    def acquire(self) -> "FolderLock":
        try:
            return self._acquire()
        except BaseException:           # e.g. Ctrl-C half-way: no lock, no folder left behind
            if self._fd is not None:
                self.release()
            else:
                self._remove_created()
            raise

    def _acquire(self) -> "FolderLock":
        self._make_folder()
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                self._remove_created()
                raise os_error(e, self.folder, f"write into the {self.what} folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise os_error(e, self.path, "lock it") from None
                holder = _read_holder(fd)
                os.close(fd)
                raise self._locked(holder) from None
            # the holder we waited for may have removed the file meanwhile: lock the live one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, only its label is missing
            pass
        return self

    def _locked(self, holder: dict) -> FolderLockedError:
        pid = holder.get("pid")
        who = (f"process {pid}" + (f" on {holder['host']}" if holder.get("host") and
                                   holder["host"] != socket.gethostname() else "")
               + (f" ({holder['command']}, since {holder.get('since')})"
                  if holder.get("command") else "")) if pid else "another process"
        return FolderLockedError(str(self.folder), f"this {self.what} folder is in use by {who}; "
                                 f"only one process may write a {self.what} folder at a time.",
                                 f"wait for it to finish, or stop it (kill {pid or 'PID'}) and "
                                 "then continue with --resume (run) or the same command (sweep).",
                                 pid=pid)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()       # while still holding it: see the inode check in acquire
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the folders acquire() created if they are empty (nothing was written)."""
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                break
        self.created = []

    def keep(self) -> None:
        """Something was written: the folders this lock created stay on release."""
        self.created = []


def _read_holder(fd: int) -> dict:
    """The JSON label of a held lock file; the holder writes it right after locking, so a
    reader that arrives in between retries briefly."""
    for _ in range(20):
        try:
            raw = os.pread(fd, 4096, 0)
        except OSError:
            return {}
        if raw:
            try:
                info = json.loads(raw.decode())
                return info if isinstance(info, dict) else {}
            except ValueError:
                return {}
        time.sleep(0.01)
    return {}


# -- memory ----------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping (``MemAvailable`` of
    ``/proc/meminfo``); elsewhere the physical memory; None if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None
