"""Report folders: one per run, created exclusively, holding the run's id, with one writer at a time.

A report folder belongs to one run: it is created exclusively (never reused),
holds the run's id (``run_id.txt``, stamped on every row it writes), and has
one writer at a time (``.lock``, an advisory lock the kernel releases when its
holder dies, so a killed run never blocks the next one).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import secrets
import shutil
import socket
import sys
import warnings
from pathlib import Path

from jaxscale.config import BadInput


RUN_ID_FILE = "run_id.txt"
LOCK_FILE = ".lock"
MIN_FREE_BYTES = 1 << 20  # below this a folder counts as full: a runs.csv row alone is a few kB


class ReportDirError(BadInput):
    """A report or output folder that cannot be used; one line naming it and what to do."""


def beside(path: Path | str, name: str) -> Path:
    """A default output folder beside a report folder or CSV: PATH/name for a folder, else the CSV's folder/name."""
    return (Path(path) if Path(path).is_dir() else Path(path).resolve().parent) / name


def stamped(stem: str) -> str:
    """A report folder name: ``stem`` and the UTC time, to the second (ReportDir.create numbers clashes)."""
    return f"{stem}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def new_run_id() -> str:
    """A run id: the UTC start time and a random suffix (text, never read back as a number)."""
    return f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def read_run_id(folder: Path | str) -> str | None:
    """The run id kept in a report folder, or None."""
    try:
        text = (Path(folder) / RUN_ID_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def _existing_ancestor(path: Path) -> Path:
    """The nearest of path and its parents that exists; a file among them is refused."""
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_output_dir(path: Path | str, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be written, before any work starts.

    Raises:
      ReportDirError: a file where the folder (or one above it) would be, a
        folder this process cannot create entries in (permissions, a read-only
        file system), or one with less than MIN_FREE_BYTES free.
    """
    where = _existing_ancestor(Path(path))
    if not where.is_dir():
        raise ReportDirError(f"{flag} {path}: {where} is a file, not a folder; give a folder path "
                             "(it is created if missing)")
    probe = Path(os.path.join(where, f".jaxscale-probe-{os.getpid()}-{secrets.token_hex(3)}"))
    try:
        probe.mkdir()
    except OSError as e:
        raise ReportDirError(f"{flag} {path}: cannot write in {where} ({e.strerror or e}); give a folder "
                             "you can write to") from None
    finally:  # also after a Ctrl-C that lands just after the mkdir
        with contextlib.suppress(OSError):
            probe.rmdir()
    try:
        stats = os.statvfs(where)
    except OSError:
        return
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        raise ReportDirError(f"{flag} {path}: no space left on the file system of {where} ({free} bytes free); "
                             "free some space or give a folder on another disk")


def os_error_line(e: OSError, what: str) -> str:
    """One line for an OSError met while writing ``what``."""
    name = e.filename or what
    return f"{name}: {e.strerror or e}" + ("; free some space" if e.errno == errno.ENOSPC else "")


class ReportDir:
    """A report folder held by this process: created exclusively or reopened to resume, and locked.

    Use ``ReportDir.create`` or ``ReportDir.reopen``; ``release`` (or the
    context manager) lets go of the lock, ``discard`` also removes a folder
    this process created and wrote no rows to.

    Attributes:
      path: the folder.
      run_id: the run's id, stamped on its rows.
      created: True when this process created the folder.
    """

    def __init__(self, path: Path, run_id: str, created: bool, lock, parents: tuple[Path, ...] = ()):
        self.path, self.run_id, self.created, self._lock = path, run_id, created, lock
        self._parents = parents  # folders above it this process created, innermost first

    @classmethod
    def for_run(cls, run_name: str, out: Path | str | None) -> "ReportDir":
        """A run's new report folder ``<out>/<name>-<UTC time>`` (``reports`` by default), held by this process.

        Raises:
          ReportDirError: ``out`` cannot hold it.
        """
        return cls.create(out or "reports", stamped(run_name))

    @classmethod
    def for_plan(cls, run_name: str, target_name: str, out: Path | str | None) -> "ReportDir":
        """A plan's new report folder ``<out>/<name>-plan-<target>-<UTC time>``, held by this process."""
        return cls.create(out or "reports", stamped(f"{run_name}-plan-{target_name.replace(':', '-')}"))

    @classmethod
    def create(cls, parent: Path | str, stem: str, flag: str = "--out") -> "ReportDir":
        """A new folder ``parent/stem`` (``stem-2``, ``stem-3``, ... when taken): never an existing one.

        Raises:
          ReportDirError: the parent cannot hold it (see ``check_output_dir``).
        """
        parent = Path(parent)
        check_output_dir(parent, flag)
        existing = _existing_ancestor(parent)
        made = tuple(p for p in (Path(os.path.abspath(parent)), *Path(os.path.abspath(parent)).parents)
                     if len(p.parts) > len(existing.parts))
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReportDirError(f"{flag} {parent}: {os_error_line(e, str(parent))}") from None
        for i in range(1, 10_000):
            path = parent / (stem if i == 1 else f"{stem}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise ReportDirError(f"{flag} {parent}: {os_error_line(e, str(path))}") from None
            run_id = new_run_id()
            try:
                lock = _lock(path)
                (path / RUN_ID_FILE).write_text(run_id + "\n")
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            return cls(path, run_id, True, lock, made)
        raise ReportDirError(f"{flag} {parent}: {stem} and 9,998 numbered variants exist already; clean up "
                             "or give another --out")

    @classmethod
    def reopen(cls, path: Path | str, last_run_id: str | None = None) -> "ReportDir":
        """An existing report folder, locked for this process, to resume a run in.

        The run keeps its id: the folder's ``run_id.txt``, else ``last_run_id``
        (that of its last row), else a new one (written to the folder).

        Raises:
          ReportDirError: not a folder, or another process holds it.
        """
        path = Path(path)
        if not path.is_dir():
            raise ReportDirError(f"--resume {path}: " + ("not a folder; give the report folder `jaxscale run` "
                                                         "wrote" if path.exists() else "no such folder"))
        lock = _lock(path)
        try:
            run_id = read_run_id(path)
            if run_id is None:
                run_id = last_run_id or new_run_id()
                (path / RUN_ID_FILE).write_text(run_id + "\n")
        except OSError as e:
            _unlock(lock)
            raise ReportDirError(f"--resume {path}: {os_error_line(e, str(path))}") from None
        except BaseException:
            _unlock(lock)
            raise
        return cls(path, run_id, False, lock)

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        if self._lock is not None:
            _unlock(self._lock)
            self._lock = None

    def discard(self) -> None:
        """Release, and remove the folder if this process created it and recorded no row in it."""
        self.release()
        csv_path = self.path / "runs.csv"
        has_rows = csv_path.exists() and len(csv_path.read_bytes().splitlines()) > 1
        if self.created and not has_rows:
            shutil.rmtree(self.path, ignore_errors=True)
            for folder in self._parents:  # the --out folders made for it, if nothing else went there since
                try:
                    folder.rmdir()
                except OSError:
                    break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder_text() -> str:
    command = " ".join(["jaxscale", *sys.argv[1:]]) if sys.argv else "python"
    since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"process {os.getpid()} on {socket.gethostname()} since {since} ({command})"


def _lock(folder: Path):
    """Take the folder's advisory lock, writing who holds it; refuse when another process has it.

    The lock is flock(2) on ``.lock``: the kernel drops it when the holding
    process ends, however it ends, so a lock left by a killed run is stale and
    taken over. File systems without flock are used unlocked.
    """
    import fcntl

    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise ReportDirError(f"{folder}: cannot create its lock file ({e.strerror or e}); give a folder "
                             "you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ReportDirError(_in_use(folder, holder)) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        warnings.warn(f"{folder}: the file system cannot lock files ({e.strerror}); nothing stops a second "
                      "run from writing here at the same time")
    text = _holder_text().encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text + b"\n", 0)
    return fd


def _in_use(folder: Path, holder: str) -> str:
    return f"{folder}: in use by {holder}; wait for it to end or stop it, or give another folder"


def check_not_in_use(folder: Path | str) -> None:
    """Refuse a report folder another process holds (see ``ReportDir``), without taking it.

    Raises:
      ReportDirError: naming the holder.
    """
    import fcntl

    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ReportDirError(_in_use(Path(folder), os.pread(fd, 4096, 0).decode(errors="replace").strip()
                                     or "another process")) from None
    except OSError:
        pass
    finally:
        os.close(fd)  # closing drops the shared lock taken to look


def _unlock(fd) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)
