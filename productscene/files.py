"""Safetensors files of ProductScene: atomic writes, header-only reads, lazy tensor loads.

Host-free. Only safetensors is accepted: pickle files (.pt/.ckpt/.bin) are never unpickled.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import struct
from typing import TYPE_CHECKING, Iterable

from .errors import ProductSceneError

if TYPE_CHECKING:  # torch and safetensors load on first use: the atomic writes serve torch-free callers
    import torch

FORMAT_KEY = "productscene.format"
VERSION_KEY = "productscene.format_version"

# safetensors dtype names -> torch dtypes (what read_header reports is the file's own name)
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own upper bound


def _not_safetensors(path, why: str) -> ProductSceneError:
    return ProductSceneError(
        f"{os.path.basename(str(path))}: not a valid safetensors file ({why}); "
        f"ProductScene only accepts .safetensors files (pickle .pt/.ckpt/.bin files are never loaded) "
        f"[path: {path}]"
    )


def _sniff(head: bytes) -> str | None:
    if head[:2] == b"PK":
        return "it is a zip/pickle checkpoint such as a .pt or .ckpt file"
    if head[:1] == b"\x80":
        return "it is a pickle file"
    return None


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None,
                            kind: str | None = None, version: int | str = 1) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically.

    The file is written under a temporary name in the same folder and moved into place with
    ``os.replace``: readers see either the old file or the complete new one, never half a file,
    and a failed write leaves no temporary file behind.
    ``metadata`` values must be strings (callers JSON-encode structures). ``productscene.format``
    (``kind`` or what ``metadata`` already says, default ``"unknown"``) and
    ``productscene.format_version`` are always set.
    """
    path = os.fspath(path)
    meta = {}
    for k, v in (metadata or {}).items():
        if not isinstance(v, str):
            raise ProductSceneError(f"metadata: value of {k!r} must be a string (JSON-encode structures), got {type(v).__name__}")
        meta[str(k)] = v
    if kind is not None:
        meta[FORMAT_KEY] = str(kind)
    meta.setdefault(FORMAT_KEY, "unknown")
    meta.setdefault(VERSION_KEY, str(version))

    import torch
    from safetensors.torch import save_file

    prepared = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ProductSceneError(f"tensors: {name!r} must be a torch tensor, got {type(t).__name__}")
        prepared[name] = t.detach().to("cpu").contiguous()

    with atomic_path(path) as tmp:
        save_file(prepared, tmp, metadata=meta)


TEMP_SUFFIX = ".tmp"


def check_writable(path, what: str, shown: str | None = None) -> str:
    """Refuse, before any work starts, an output ``path`` that cannot be written: it is a folder,
    a folder on its way is a file, or the nearest existing folder is not writable. ``what`` names
    the input in the message; ``shown`` is how the path is shown (default: as given)."""
    path = os.path.abspath(os.fspath(path))
    shown = os.fspath(path) if shown is None else shown
    if os.path.isdir(path):
        raise ProductSceneError(f"{what}: {shown!r} is a folder; expected a file name to write")
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        raise ProductSceneError(
            f"{what}: cannot write {shown!r}: {os.path.basename(folder)!r} on its way is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ProductSceneError(f"{what}: cannot write {shown!r}: its folder is not writable")
    return path


def refuse_overwrite(path, what: str, hint: str, shown: str | None = None) -> None:
    """An existing file at ``path`` is never replaced without the user saying so: raise, naming
    ``what`` and what to do instead (``hint``)."""
    if os.path.lexists(os.fspath(path)):
        shown = os.fspath(path) if shown is None else shown
        raise ProductSceneError(f"{what}: {shown!r} already exists and would be replaced; {hint}")


def temp_prefix(path) -> str:
    """How the temporary names of ``path``'s atomic writes begin (``.<name>.``), in its folder."""
    return "." + os.path.basename(os.fspath(path)) + "."


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; when the block ends without error it is renamed to
    ``path`` (``os.replace``), otherwise removed. Readers see the old file or the whole new one.
    The name holds this process's id and a serial number: unique among running processes, so it
    needs no random name or a file made ahead (what tempfile.mkstemp costs)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):       # one stat where the folder exists (the batch's many outputs)
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{temp_prefix(name)}{os.getpid()}.{next(_serial)}{TEMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_serial = itertools.count()     # next() on it is atomic under the GIL: safe from several threads


def write_bytes_atomic(path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary name, then renamed). ``durable``: flushed to
    disk before the rename (a caller that syncs many files at once passes False)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())


def read_header(path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """Parse the safetensors header only (8-byte little-endian length + JSON); no tensor is read.

    Returns ``(metadata, index)`` with ``index = {name: (dtype, shape)}``. Anything that is not a
    well-formed safetensors file raises ProductSceneError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProductSceneError(f"{os.path.basename(path)}: file not found [path: {path}]")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, "file too short")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise _not_safetensors(path, _sniff(head) or "bad header length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_safetensors(path, _sniff(head) or "header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _not_safetensors(path, "metadata is not a string map")
    index = {}
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise _not_safetensors(path, f"bad entry for tensor {name!r}") from None
        if not (0 <= start <= end <= data_len):
            raise _not_safetensors(path, f"tensor {name!r} lies past the end of the file (truncated?)")
        index[name] = (dtype, shape)
    return dict(metadata), index


def load_tensors(path, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Load tensors (only ``keys`` when given) with ``safetensors.safe_open``; never unpickles."""
    path = os.fspath(path)
    from safetensors import safe_open

    read_header(path)  # validates, gives the clear error for non-safetensors files
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else list(keys)
            available = set(f.keys())
            missing = [k for k in names if k not in available]
            if missing:
                raise ProductSceneError(
                    f"{os.path.basename(path)}: missing tensor(s) {missing[:5]} [path: {path}]")
            return {k: f.get_tensor(k) for k in names}
    except ProductSceneError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise _not_safetensors(path, str(e)) from None



def check_format(meta: dict, kind: str, supported_versions, path=None) -> int:
    """Check ``productscene.format == kind`` and that the version is supported; return the version.

    ``supported_versions`` is a collection of ints or a single int (the maximum version).
    """
    where = os.path.basename(os.fspath(path)) if path is not None else "file"
    found = meta.get(FORMAT_KEY)
    if found != kind:
        what = f"a ProductScene {found!r} file" if found else "not a ProductScene file"
        raise ProductSceneError(f"{where}: expected a ProductScene {kind!r} file, but it is {what}")
    try:
        version = int(meta.get(VERSION_KEY, ""))
    except ValueError:
        raise ProductSceneError(f"{where}: {VERSION_KEY} is missing or not a number") from None
    if isinstance(supported_versions, int):
        ok = 1 <= version <= supported_versions
        shown = f"1..{supported_versions}"
    else:
        versions = {int(v) for v in supported_versions}
        ok = version in versions
        shown = ", ".join(str(v) for v in sorted(versions))
    if not ok:
        raise ProductSceneError(
            f"{where}: {kind} format version {version} is not supported by this ProductScene "
            f"(supported: {shown}); update ProductScene or re-export the file")
    return version
