"""Fault injection for the run-directory tests: a disk that fills up, folders without
permission (simulated when the tests run as root, for whom chmod changes nothing), and a helper
that runs a command in a private mount namespace with a real small tmpfs (root only).

The simulations raise the same ``OSError`` (same errno) at the same system call as the real
fault, so the code under test takes the same path.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _usage(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except FileNotFoundError:
                pass
    return total


class SmallDisk:
    """Patches ``os.write`` so that ``root`` behaves like a disk that fills up once ``trigger``
    (a path relative to ``root``) exists: from then on its capacity is the bytes then used plus
    ``free(trigger_size)``, and a write into a file under ``root`` that would exceed it fails
    with ENOSPC (removing files frees their bytes again, as on a real disk)."""

    def __init__(self, monkeypatch, root: Path, trigger: str, free):
        self.root = str(Path(root).resolve())
        self.trigger = Path(root) / trigger
        self.free = free
        self.capacity = None
        self.failures = []
        self._write = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(self.root + os.sep):
            if self.capacity is None and self.trigger.exists():
                self.capacity = _usage(Path(self.root)) + self.free(self.trigger.stat().st_size)
            if self.capacity is not None and _usage(Path(self.root)) + len(data) > self.capacity:
                self.failures.append(target)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._write(fd, data)


def _inside(path, folder: Path) -> bool:
    try:
        p = os.path.abspath(os.fspath(path))
    except TypeError:
        return False
    f = str(folder)
    return p == f or p.startswith(f + os.sep)


def deny_writes(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only: ``chmod a-w`` for ordinary users; as root (who ignores the
    mode) creating or writing a file or folder inside it (``os.open``, ``open``, ``os.mkdir``)
    fails with EACCES, as it would."""
    folder = Path(folder).resolve()
    if not IS_ROOT:
        folder.chmod(0o555)
        return
    import builtins

    real_open, real_mkdir, real_builtin_open = os.open, os.mkdir, builtins.open

    def fake_open(path, flags, *a, **k):
        if _inside(path, folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *a, **k)

    def fake_builtin_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and _inside(file, folder) and \
                any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_builtin_open(file, mode, *a, **k)

    def fake_mkdir(path, *a, **k):
        if _inside(path, folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(builtins, "open", fake_builtin_open)


def deny_search(monkeypatch, folder: Path) -> None:
    """Take the search (x) permission from ``folder``: looking up anything inside fails with
    EACCES (``chmod a-x``; simulated at ``os.stat`` as root)."""
    folder = Path(folder).resolve()
    if not IS_ROOT:
        folder.chmod(0o600)
        return
    real_stat = os.stat

    def fake_stat(path, *a, **k):
        if isinstance(path, (str, os.PathLike)) and _inside(path, folder) and \
                os.path.abspath(os.fspath(path)) != str(folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", fake_stat)


def restore_modes(*folders) -> None:
    for f in folders:
        if Path(f).exists():
            Path(f).chmod(0o755)


def tmpfs_runner():
    """A function ``run(mountpoint, size, argv) -> CompletedProcess`` that runs ``argv`` in a
    private mount namespace with a fresh tmpfs of ``size`` at ``mountpoint`` (gone when the
    command ends, even if it is killed), or None where that is not possible (not root, no
    ``unshare``, no permission to mount)."""
    unshare = shutil.which("unshare")
    if not IS_ROOT or unshare is None:
        return None
    probe = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k none /mnt && umount /mnt"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None

    def run(mountpoint: Path, size: str, argv, **kw):
        script = 'mount -t tmpfs -o size="$1" none "$2" && shift 2 && exec "$@"'
        return subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", script,
                               "sh", size, str(mountpoint), *map(str, argv)], **kw)

    return run
