"""Caches keyed by what produced them, written atomically, in safe formats (JSON, safetensors).

A cache entry is ``NAME.json`` (its key and small payload) and, for tensors, ``NAME.safetensors``.
The key is a hash of everything the result depends on (data file contents, model identity,
tokenizer, reward spec, flags). A mismatching key is recomputed with a message; a file that a
killed run left half-written is never read because files are renamed into place only when complete;
a damaged entry (its digests, tensor layout or payload types differ from what it promises) is
recomputed with a message. With several processes every process reads the entry and they agree:
it is used only when every one of them found it intact, else every one recomputes (a process that
decided alone would leave the others' collectives out of step), and a save returns once it is
written, so a later load sees it on every process.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lolrl.utils.io import atomic_write_bytes, atomic_write_json, to_jsonable
from lolrl.utils.manifest import (
    IntegrityError,
    describe_files,
    sha256_file,
    verify_files,
)
from lolrl.utils.processes import on_every_process, wait_for_everyone

logger = logging.getLogger(__name__)


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True, default=repr).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=None)
def _digest_of(path: str, size: int, modified_ns: int) -> str:
    return sha256_file(path)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, computed once per process for a file of this size and modification time
    (a model's weights are identified for several cache keys and the run key)."""
    stat = os.stat(path)
    return _digest_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def model_identity(name: str) -> dict:
    """What identifies a checkpoint: for a local folder, the digest of its weights and config files (not
    where the folder is: a copy elsewhere is the same model); for a hub id, the id (the hub's revision
    pins its contents)."""
    path = Path(name)
    if not path.is_dir():
        return {"hub_id": name}
    suffixes = (".safetensors", ".bin", ".json", ".model", ".txt")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    return {"files": {p.name: file_digest(p) for p in files}}


def records_digest(records: list) -> str:
    """Digest of the records as parsed, every field included (so a file re-ordered or edited changes it,
    and so do the extra fields that travel to reward functions as columns)."""
    return hash_json([[r.id, r.prompt, r.response, r.reward, r.reward_components, r.meta] for r in records])


class Cache:
    """``load(name, key, check)`` / ``save(name, key, payload, tensors)``. Every entry carries a manifest
    (the digest of its payload and the size, digest and tensor layout of its tensor file); an entry
    that fails it, or that ``check`` rejects (wrong type or shape), is damaged: recomputed with a message."""

    def __init__(self, directory: str | os.PathLike, enabled: bool = True, accelerator=None):
        self.directory = Path(directory)
        self.enabled = enabled
        self.accelerator = accelerator  # None: one process
        self.is_main_process = accelerator is None or accelerator.is_main_process

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.json", self.directory / f"{name}.safetensors"

    def load(self, name: str, key: str, check=None) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """``(payload, tensors)`` when a complete, intact entry with this key exists (on every
        process), else None (on every process). ``check(payload, tensors)`` may raise (KeyError,
        TypeError, ValueError, IndexError, AssertionError) when the entry's contents do not have the
        expected types and shapes."""
        if not self.enabled:
            return None
        found = self._load_here(name, key, check)
        if not on_every_process(self.accelerator, found is not None):
            if found is not None:
                logger.warning("cache %s: another process could not read it: every process recomputes", name)
            return None
        if found is not None:
            logger.info("reusing cache %s", self._paths(name)[0])
        return found

    def _load_here(self, name: str, key: str, check) -> tuple[dict, dict[str, torch.Tensor]] | None:
        meta_path, tensor_path = self._paths(name)
        if not self.enabled or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise IntegrityError(f"{meta_path.name} is not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError, IntegrityError) as exc:
            logger.warning("cache %s is unreadable (%s): recomputing", meta_path, exc)
            return None
        if meta.get("key") != key:
            logger.warning("cache %s was computed from other inputs (key %s, now %s): recomputing",
                           meta_path.name, meta.get("key"), key)
            return None
        try:
            return self._verified(meta, tensor_path, check)
        except (IntegrityError, KeyError, TypeError, ValueError, IndexError, AssertionError) as exc:
            logger.warning("cache %s is damaged (%s): recomputing", meta_path, exc)
            return None

    def _verified(self, meta: dict, tensor_path: Path, check) -> tuple[dict, dict[str, torch.Tensor]]:
        payload = meta.get("payload")
        if not isinstance(payload, dict) or meta.get("payload_digest") != hash_json(payload):
            raise IntegrityError("its payload differs from its digest")
        files = meta.get("files")
        if not isinstance(files, dict) or set(files) - {tensor_path.name}:
            raise IntegrityError("no manifest (written by an older lolrl?)")
        verify_files(self.directory, files)
        tensors = {}
        if files:
            from safetensors.torch import load_file

            tensors = load_file(str(tensor_path))
            if tensors.get("__key__") is None or bytes(tensors.pop("__key__").tolist()).decode() != meta["key"]:
                raise IntegrityError("its tensors were written for another key")
        if check is not None:
            check(payload, tensors)
        return payload, tensors

    def save(self, name: str, key: str, payload: dict | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the entry (main process) and return once it is there for every process."""
        if not self.enabled:
            return
        if self.is_main_process:
            self._write(name, key, payload, tensors)
        wait_for_everyone(self.accelerator)

    def _write(self, name: str, key: str, payload: dict | None, tensors: dict[str, torch.Tensor] | None) -> None:
        meta_path, tensor_path = self._paths(name)
        files = {}
        if tensors:
            from safetensors.torch import save

            # The key travels inside the tensor file too, so a json/tensor pair from two runs never mixes.
            blob = {k: v.contiguous().cpu() for k, v in tensors.items()}
            blob["__key__"] = torch.tensor(list(key.encode()), dtype=torch.uint8)
            atomic_write_bytes(tensor_path, save(blob))
            files = describe_files(self.directory, [tensor_path.name])
        payload = to_jsonable(payload or {})
        atomic_write_json(meta_path, {"key": key, "payload": payload, "payload_digest": hash_json(payload),
                                      "files": files})
