"""A write the store's disk refuses (full, over quota, read-only) is ResourceExhaustedError,
saying so, wherever it happens (`disk_faults`, on store methods); a volume that cannot take
writes at all refuses the store's start (`refuse_unusable_volume`)."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from transfer_service.errors import ConfigurationError, ResourceExhaustedError

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

# Errnos of a write the filesystem refuses for space (ENOSPC, EDQUOT) or for good (EROFS).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# SQLite reports some writes on a full disk (growing its shared-memory index, say) only as a
# generic I/O error: with less than this left on the volume, that error means "full".
_NEARLY_FULL_BYTES = 1024**2


def disk_fault(error: BaseException, root: Path) -> str | None:
    """'full' or 'read-only' when `error` is the store's disk refusing a write, else None."""
    if isinstance(error, OSError) and not isinstance(error, sqlite3.Error):
        if error.errno in _FULL_ERRNOS:
            return "full"
        return "read-only" if error.errno == errno.EROFS else None
    if not isinstance(error, sqlite3.OperationalError):
        return None
    name = getattr(error, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or "database or disk is full" in str(error):
        return "full"
    if name.startswith("SQLITE_READONLY") or "readonly database" in str(error):
        return "read-only"
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")) or "disk I/O error" in str(error):
        return volume_state(root)
    return None


def volume_state(root: Path) -> str | None:
    """'read-only' or 'full' (under 1 MiB left) for the volume holding `root`, else None."""
    try:
        volume = os.statvfs(root)
    except OSError:
        return None
    if volume.f_flag & os.ST_RDONLY:
        return "read-only"
    return "full" if volume.f_bavail * volume.f_frsize < _NEARLY_FULL_BYTES else None


def free_bytes(root: Path) -> int:
    volume = os.statvfs(root)
    return volume.f_bavail * volume.f_frsize


def refuse_unusable_volume(root: Path) -> None:
    """ConfigurationError when the volume under `root` is full or read-only. Refused up front,
    by name: on a full volume SQLite fails later and vaguely ("disk I/O error" while growing
    its shared-memory index), or not at all until the first job's write."""
    volume = volume_state(root)
    if volume is not None:
        raise ConfigurationError(
            f"the store's disk is {volume} (TRANSFER_STORE_DIR={root}, "
            f"{free_bytes(root)} bytes free): free space on that volume or make "
            "it writable, then start again"
        )


def disk_faults(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Store methods (of an object with a `_root`) raise ResourceExhaustedError when the disk
    refuses a write: a caller then reads RESOURCE_EXHAUSTED with the reason, not INTERNAL."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except (sqlite3.OperationalError, OSError) as exc:
            root: Path = getattr(args[0], "_root", Path("."))
            fault = disk_fault(exc, root)
            if fault is None:
                raise
            log.error("store write refused: the disk under %s is %s: %s", root, fault, exc)
            raise ResourceExhaustedError(
                f"the store's disk is {fault}: {exc}; nothing was written (the operator must "
                "free space on the store's volume or make it writable)"
            ) from exc

    return wrapper
