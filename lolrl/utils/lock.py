"""No clobbering: one run per output (and save) folder, and no save folder inside the starting model.

:func:`hold_folders` takes a lock file ``.lolrl.lock`` (``{"pid", "host", "started"}``, created
exclusively) in each folder for the length of a run; a second run on the same folder is refused
with one line naming the holder. A lock whose process is gone (same host, dead pid) is taken over
with a message. :func:`check_output_paths` refuses, before anything loads, an output path that is
a file and a save folder equal to or inside the starting model's (or adapter's) folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from lolrl.utils.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lolrl.lock"


class FolderInUseError(UserError):
    """Another run holds the folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _is_stale(holder: dict | None, path: Path) -> bool:
    if holder is None:  # unreadable: a writer killed mid-write (or one writing right now: give it a moment)
        return time.time() - path.stat().st_mtime > 10
    if holder.get("host") != socket.gethostname():
        return False  # cannot tell whether a process on another machine is alive
    return holder["pid"] == os.getpid() or not _pid_alive(holder["pid"])


class FolderLock:
    """``with FolderLock(folder, "output folder"):`` holds ``folder/.lolrl.lock`` for the block."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.token = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def acquire(self) -> None:
        ensure_folder(self.folder, self.what)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if not _is_stale(holder, self.path):
                    who = (f"pid {holder['pid']} on host {holder.get('host')} since {holder.get('started')}"
                           if holder else "a run starting now")
                    raise FolderInUseError(f"{self.what} {self.folder} is in use by {who}: use another folder, or "
                                           f"remove {self.path} if that run is gone") from None
                logger.warning("%s %s: taking over the lock of %s (that process is gone)", self.what, self.folder,
                               f"pid {holder['pid']}" if holder else "an unfinished start")
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.token, handle)
            self.held = True
            return
        raise FolderInUseError(f"{self.what} {self.folder}: could not take its lock {self.path}")

    def release(self) -> None:
        if self.held and _holder(self.path) == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def ensure_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder``; a path that is a file (or cannot be created) is a one-line error."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {folder}: cannot create it ({exc.strerror or exc})") from None
    return folder


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_paths(folders: dict[str, str | None], save_dir: str | None, starting: dict[str, str | None]) -> None:
    """``folders``: {what: path} the run writes; ``starting``: {what: path} it starts from (a model id
    that is not a local folder is skipped). Refuses a file where a folder goes, and a save folder equal
    to or inside a starting folder (saving the best model would overwrite the weights the run starts from)."""
    for what, path in {**folders, "save folder": save_dir}.items():
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise ConfigError(f"{what} {path} is a file, not a folder")
    for what, source in starting.items():
        if save_dir is not None and source is not None and Path(source).is_dir() and _inside(Path(save_dir),
                                                                                              Path(source)):
            raise ConfigError(f"save folder {save_dir} is inside the {what} {source}: saving would overwrite "
                              "what the run starts from; choose another --save_dir / output folder")


def hold_folders(folders: dict[str, str | os.PathLike], enabled: bool = True) -> contextlib.ExitStack:
    """Locks on every distinct folder of ``{what: folder}`` (only where ``enabled``: the main process)."""
    stack = contextlib.ExitStack()
    if enabled:
        seen = set()
        try:
            for what, folder in folders.items():
                key = Path(folder).resolve()
                if key not in seen:
                    seen.add(key)
                    stack.enter_context(FolderLock(folder, what))
        except BaseException:
            stack.close()
            raise
    return stack
