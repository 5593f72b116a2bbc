"""Manifests: what a folder of results must hold, so anything read back is verified before use.

``write_manifest(folder)`` records, for every file in the folder, its size and SHA-256 and, for a
``.safetensors`` file, the name, dtype and shape of every tensor (read from its header).
``verify_manifest(folder)`` checks the folder against it and raises :class:`IntegrityError` at the
first difference. Any checkpoint format calls these two (today's safetensors checkpoints; a
sharded format adds its files to the same folder before ``write_manifest``); caches embed the same
per-file description (:func:`describe_files` / :func:`verify_files`).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from lolrl.utils.errors import UserError
from lolrl.utils.io import atomic_write_json

MANIFEST = "manifest.json"
FORMAT = 1


class IntegrityError(UserError):
    """A checkpoint or cache file is damaged, incomplete or foreign: never used."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safetensors_layout(path: str | os.PathLike) -> dict[str, list]:
    """``{tensor name: [dtype, shape]}`` from a safetensors file's header (the tensors are not read)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise IntegrityError(f"{path}: not a safetensors file (truncated header)")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise IntegrityError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: not a safetensors file (header is not an object)")
    return {name: [entry.get("dtype"), entry.get("shape")] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)}


def describe_file(path: Path) -> dict:
    entry = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if path.suffix == ".safetensors":
        entry["tensors"] = safetensors_layout(path)
    return entry


def describe_files(directory: str | os.PathLike, names: list[str]) -> dict[str, dict]:
    directory = Path(directory)
    return {name: describe_file(directory / name) for name in sorted(names)}


def verify_files(directory: str | os.PathLike, entries) -> None:
    """Every file named in ``entries`` (as :func:`describe_files` wrote them) is there, whole and unchanged."""
    directory = Path(directory)
    if not isinstance(entries, dict):
        raise IntegrityError(f"{directory}: its manifest lists no files")
    for name, expected in entries.items():
        path = directory / name
        if not isinstance(expected, dict) or not path.is_file():
            raise IntegrityError(f"{path}: missing")
        if path.stat().st_size != expected.get("bytes"):
            raise IntegrityError(f"{path}: {path.stat().st_size} bytes, the manifest says {expected.get('bytes')}")
        if sha256_file(path) != expected.get("sha256"):
            raise IntegrityError(f"{path}: its contents differ from the manifest's digest (damaged)")
        if "tensors" in expected and safetensors_layout(path) != expected["tensors"]:
            raise IntegrityError(f"{path}: its tensors differ from the manifest's names, dtypes and shapes")


def write_manifest(directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Describe every file of ``directory`` (sub-folders included) in ``directory/manifest.json``;
    call it last, when every other file is complete."""
    directory = Path(directory)
    names = [str(p.relative_to(directory)) for p in directory.rglob("*")
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
    path = directory / MANIFEST
    atomic_write_json(path, {"format": FORMAT, "files": describe_files(directory, names), **(extra or {})})
    return path


def verify_manifest(directory: str | os.PathLike) -> dict:
    """Check ``directory`` against its manifest; returns the manifest, raises :class:`IntegrityError`."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{directory}: no {MANIFEST} (incomplete, or written by an older lolrl)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{path}: unreadable") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path}: not a manifest of format {FORMAT}")
    verify_files(directory, manifest.get("files"))
    return manifest
