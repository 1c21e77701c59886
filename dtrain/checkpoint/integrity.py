"""Knowing a saved file is the one that was written: checksums taken while the bytes go out, checked before use.

A checkpoint's state.pt is hashed (sha256) as torch.save writes it, so committing it costs no second read;
commit.json records the digest next to the size, and a resume re-reads the file once to compare. Files without
a recorded digest (model.pt, or checkpoints of dtrain versions before digests) still carry torch's own CRC-32
per zip record, which `zip_problem` checks: torch.load itself reads neither.

A write that fails (a full disk) surfaces in torch.save as `[enforce fail at inline_container.cc] unexpected
pos ...`; `save_hashed` raises the OSError that caused it instead, naming the file.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from typing import Any, Optional

import torch

ALGORITHM = "sha256"
"""The digest commit.json records (under this key): hashlib's OpenSSL sha256 hashes faster than blake2b on CPUs
with SHA instructions, which most servers have."""
_CHUNK = 8 * 2**20


class HashingWriter:
    """A binary file torch.save writes through: hashes every byte it passes on and keeps the first OSError, which
    torch replaces with a RuntimeError of its own."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.hash = hashlib.new(ALGORITHM)
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            written = self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.hash.update(data)
        return written

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def save_hashed(obj: Any, path: str) -> str:
    """torch.save `obj` to `path`, flushed and fsynced; its digest. A failed write raises its OSError (with
    `path` as its filename), not torch's RuntimeError."""
    writer: Optional[HashingWriter] = None
    try:
        with open(path, "wb") as f:
            writer = HashingWriter(f)
            torch.save(obj, writer)
            writer.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:
        cause = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), path) from None
        raise
    return writer.hash.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_problem(directory: str, sizes: dict[str, int], digests: Optional[dict[str, str]]) -> Optional[str]:
    """What is wrong with the files of `directory` against the sizes (and digests, when recorded) taken when they
    were committed, naming the first bad file; None when they match. Without digests, torch's CRC-32s are checked."""
    for name, size in sizes.items():
        path = os.path.join(directory, name)
        try:
            actual = os.path.getsize(path)
        except OSError as exc:
            return f"{path}: {exc.strerror or exc} (committed with {size} bytes)"
        if actual != size:
            return f"{path}: {actual} bytes, {size} when committed (cut or changed after the commit)"
    for name in sizes:
        path = os.path.join(directory, name)
        try:
            if digests is not None and name in digests:
                if file_digest(path) != digests[name]:
                    return f"{path}: checksum mismatch (changed after the commit)"
            elif name.endswith(".pt"):
                problem = zip_problem(path)
                if problem is not None:
                    return problem
        except OSError as exc:
            return f"{path}: cannot be read ({exc.strerror or exc})"
    return None


def zip_problem(path: str) -> Optional[str]:
    """Whether a torch.save file's records still match the CRC-32s torch wrote into it; None when they do (or
    when there is nothing to check: a legacy non-zip file, or records saved without CRCs)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        return None if _legacy(path) else f"{path}: not a whole torch file (its zip directory is missing or cut)"
    with archive:
        for info in archive.infolist():
            try:
                with archive.open(info) as member:
                    while member.read(_CHUNK):
                        pass
            except zipfile.BadZipFile as exc:
                if "CRC" not in str(exc):
                    return f"{path}: its record {info.filename} is damaged ({exc})"
                if info.CRC == 0:  # torch.serialization.set_crc32_options(False) writes 0
                    continue
                return f"{path}: checksum mismatch in its record {info.filename} (changed after it was written)"
            except (EOFError, ValueError, NotImplementedError) as exc:
                return f"{path}: its record {info.filename} is damaged ({type(exc).__name__}: {exc})"
    return None


def _legacy(path: str) -> bool:
    """torch's pre-1.6 format (a pickle stream, no zip): nothing to check it against."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"
