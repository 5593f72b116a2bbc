"""Caches keyed by what produced them, written atomically, in safe formats (JSON, safetensors).

A cache entry is ``NAME.json`` (its key and small payload) and, for tensors, ``NAME.safetensors``.
The key is a hash of everything the result depends on (data file contents, model identity,
tokenizer, reward spec, flags). A mismatching key is recomputed with a message; a file that a
killed run left half-written is never read because files are renamed into place only when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lolrl.utils.io import atomic_write_bytes, atomic_write_json, to_jsonable

logger = logging.getLogger(__name__)


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()[:24]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_identity(name: str) -> dict:
    """What identifies a checkpoint: for a local folder, the digest of its weights and config files;
    for a hub id, the id (the hub's revision pins its contents)."""
    path = Path(name)
    if not path.is_dir():
        return {"hub_id": name}
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".model", ".txt"))
    return {"path": str(path.resolve()), "files": {p.name: file_digest(p) for p in files}}


def records_digest(records: list) -> str:
    """Digest of the records as parsed (so a file re-ordered or edited changes it)."""
    return hash_json([[r.id, r.prompt, r.response, r.reward, r.reward_components] for r in records])


class Cache:
    def __init__(self, directory: str | os.PathLike, enabled: bool = True, is_main_process: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        self.is_main_process = is_main_process

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.json", self.directory / f"{name}.safetensors"

    def load(self, name: str, key: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """``(payload, tensors)`` when a complete entry with this key exists, else None."""
        meta_path, tensor_path = self._paths(name)
        if not self.enabled or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            logger.warning("cache %s is unreadable: recomputing", meta_path)
            return None
        if meta.get("key") != key:
            logger.warning("cache %s was computed from other inputs (key %s, now %s): recomputing",
                           meta_path.name, meta.get("key"), key)
            return None
        tensors = {}
        if meta.get("has_tensors"):
            from safetensors.torch import load_file

            if not tensor_path.exists():
                return None
            try:
                tensors = load_file(str(tensor_path))
            except Exception as exc:  # truncated or corrupt file (safetensors raises its own error type)
                logger.warning("cache %s is unreadable (%s): recomputing", tensor_path.name, exc)
                return None
            if tensors.get("__key__") is None or bytes(tensors.pop("__key__").tolist()).decode() != key:
                logger.warning("cache %s tensors do not match their key: recomputing", tensor_path.name)
                return None
        logger.info("reusing cache %s", meta_path)
        return meta.get("payload", {}), tensors

    def save(self, name: str, key: str, payload: dict | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> None:
        if not self.enabled or not self.is_main_process:
            return
        meta_path, tensor_path = self._paths(name)
        if tensors:
            from safetensors.torch import save

            # The key travels inside the tensor file too, so a json/tensor pair from two runs never mixes.
            blob = {k: v.contiguous().cpu() for k, v in tensors.items()}
            blob["__key__"] = torch.tensor(list(key.encode()), dtype=torch.uint8)
            atomic_write_bytes(tensor_path, save(blob))
        atomic_write_json(meta_path, {"key": key, "has_tensors": bool(tensors), "payload": payload or {}})
