"""The head store: trained heads as files in a directory, one directory per head.

Layout under the root:
  heads/<head_id>/head.json, weights.safetensors   (a head exists iff its directory does)
  heads/<head_id>/tenant                           (its owner again, see UnreadableHeadError)
  heads/<head_id>/.head.json.partial               (a version being written in; see set_version)
  heads/.partial-*/                                (saves in progress; removed at start)
  heads/.deleted-*/                                (deletes in progress; removed at start)
A head is written into a partial directory, fsynced, then renamed into place: a crash at any
point leaves either the whole head or nothing under its id. head.json holds the weights'
SHA-256, checked on every load. Any store keeping its heads on a filesystem uses this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from transfer_service.domain import TENANT_PATTERN, HeadRecord
from transfer_service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnreadableHeadError,
)
from transfer_service.store.codec import (
    HeadFormatError,
    decode_head,
    decode_weights,
    head_to_json,
)
from transfer_service.store.disk_faults import disk_faults
from transfer_service.store.ids import check_id

_HEAD_META = "head.json"
_HEAD_WEIGHTS = "weights.safetensors"
_HEAD_OWNER = "tenant"

log = logging.getLogger(__name__)


class HeadFiles:
    """The heads under `root`/heads (a HeadStore). Opening it creates the directory and
    removes what saves and deletes cut off by a crash left behind."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()
        self._heads_dir = self._root / "heads"
        self._unlisted_heads: set[str] = set()  # damaged heads already warned about
        self._heads_dir.mkdir(parents=True, exist_ok=True)
        for partial in self._heads_dir.glob(".partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
        for deleted in self._heads_dir.glob(".deleted-*"):
            shutil.rmtree(deleted, ignore_errors=True)

    def stored_count(self) -> int:
        """How many head directories there are, damaged ones included."""
        return sum(1 for path in self._heads_dir.iterdir() if not path.name.startswith("."))

    def _head_dir(self, head_id: str) -> Path:
        path = (self._heads_dir / check_id("head_id", head_id)).resolve()
        if path.parent != self._heads_dir:
            raise InvalidArgumentError(f"head_id: {head_id!r} escapes the store")
        return path

    @disk_faults
    def save_head(self, record: HeadRecord, weights: dict[str, torch.Tensor]) -> None:
        """Writes the weights, head.json (with the weights' SHA-256) and the `tenant` file
        (the owner alone, so ownership stays readable if head.json is ever damaged) into a
        partial directory, then renames it into place."""
        final = self._head_dir(record.head_id)
        partial = self._heads_dir / f".partial-{record.head_id}-{secrets.token_hex(4)}"
        partial.mkdir()
        try:
            # Serialised in memory so the checksum is of exactly the bytes that are written.
            data = safetensors_save(weights)
            (partial / _HEAD_WEIGHTS).write_bytes(data)
            (partial / _HEAD_META).write_text(
                head_to_json(record, hashlib.sha256(data).hexdigest()), encoding="utf-8"
            )
            (partial / _HEAD_OWNER).write_text(record.tenant, encoding="utf-8")
            for name in (_HEAD_WEIGHTS, _HEAD_META, _HEAD_OWNER):
                _fsync_file(partial / name)
            _fsync_dir(partial)
            os.rename(partial, final)
            _fsync_dir(self._heads_dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    @disk_faults
    def set_version(self, head_id: str, version: int) -> HeadRecord:
        """Writes `version` into the head's head.json (a head stored before versions had
        none): a new file beside it, fsynced, renamed over it, so a crash leaves the old file
        or the new one. Returns the record as it is now."""
        record, checksum = self._read_head(head_id)
        record = dataclasses.replace(record, version=version)
        head_dir = self._head_dir(head_id)
        partial = head_dir / f".{_HEAD_META}.partial"
        partial.write_text(head_to_json(record, checksum), encoding="utf-8")
        _fsync_file(partial)
        os.replace(partial, head_dir / _HEAD_META)
        _fsync_dir(head_dir)
        return record

    def get_head(self, head_id: str) -> HeadRecord:
        """Raises UnreadableHeadError (a FailedPreconditionError) for a head whose metadata
        is damaged in any way, never anything else."""
        return self._read_head(head_id)[0]

    def _read_head(self, head_id: str) -> tuple[HeadRecord, str | None]:
        """The record and its weights' SHA-256 (None for heads saved before checksums)."""
        head_dir = self._head_dir(head_id)
        try:
            data = (head_dir / _HEAD_META).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"head_id: no head {head_id!r}") from None
        except OSError as exc:  # a directory in its place, no permission, an I/O error
            raise UnreadableHeadError(
                head_id, f"metadata unreadable ({exc.strerror})", _read_owner(head_dir)
            ) from exc
        try:
            record, checksum = decode_head(data)
        except HeadFormatError as exc:
            raise UnreadableHeadError(
                head_id, f"metadata unreadable ({exc})", _read_owner(head_dir)
            ) from exc
        if record.head_id != head_id:
            # Caches and tenancy checks key on the id: a record filed under another id is
            # as unusable as a damaged one.
            raise UnreadableHeadError(
                head_id, f"metadata names another head ({record.head_id!r})", _read_owner(head_dir)
            )
        return record, checksum

    def load_head_weights(self, head_id: str) -> dict[str, torch.Tensor]:
        """Checks the weights against the SHA-256 that head.json holds: a damaged file must
        fail loudly here rather than predict wrongly. Heads saved before checksums existed
        have none and load unchecked, as they always did."""
        path = self._head_dir(head_id) / _HEAD_WEIGHTS
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(f"head_id: no head {head_id!r}") from None
        except OSError as exc:
            raise FailedPreconditionError(
                f"head {head_id!r}: stored weights unreadable ({exc.strerror})"
            ) from exc
        _, checksum = self._read_head(head_id)
        return decode_weights(head_id, data, checksum)

    def stored_ids(self) -> list[str]:
        """The ids of every complete head directory (both files present: the rename makes
        that so for a save; this keeps a directory damaged since out of listings too)."""
        return [
            path.name
            for path in sorted(self._heads_dir.iterdir())
            if not path.name.startswith(".")
            and (path / _HEAD_META).is_file()
            and (path / _HEAD_WEIGHTS).is_file()
        ]

    def listed_head(self, head_id: str) -> HeadRecord | None:
        """The head's record for a listing, or None: a damaged head is left out (with a
        warning, once per head and process) rather than failing the listing, since one
        caller's broken head must not take ListHeads away from every other caller."""
        try:
            if not (self._head_dir(head_id) / _HEAD_WEIGHTS).is_file():
                return None  # not both files: not a head (see stored_ids)
            return self.get_head(head_id)
        except (InvalidArgumentError, NotFoundError):
            return None  # not a head id, or deleted since it was listed
        except FailedPreconditionError as exc:
            if head_id not in self._unlisted_heads:
                self._unlisted_heads.add(head_id)
                log.warning("head %r left out of listings: %s", head_id, exc.message)
            return None

    @disk_faults
    def delete_head(self, head_id: str) -> None:
        """Works whatever state the head's files are in (the caller checks ownership)."""
        path = self._head_dir(head_id)
        if not path.is_dir():
            raise NotFoundError(f"head_id: no head {head_id!r}")
        # Rename first so the head vanishes atomically, then remove the files.
        doomed = self._heads_dir / f".deleted-{head_id}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        _fsync_dir(self._heads_dir)
        shutil.rmtree(doomed, ignore_errors=True)
        self._unlisted_heads.discard(head_id)


def _read_owner(head_dir: Path) -> str | None:
    """The tenant in a head's `tenant` file, or None if it is missing or not a tenant."""
    try:
        owner = (head_dir / _HEAD_OWNER).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    return owner if TENANT_PATTERN.fullmatch(owner) else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
