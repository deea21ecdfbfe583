"""Model folders of ProductScene inside ComfyUI's ``folder_paths``.

Importing this module registers ``models/category_libraries``, ``models/personality_adapters`` and
``models/ipadapter`` (``.safetensors`` only; the folder IPAdapter_plus also registers). Category
libraries may also sit in ``models/embeddings``, IP-Adapter files used as personality adapters in
``models/ipadapter``: both are recognised by their header.
"""
from __future__ import annotations

import logging
import os

import folder_paths

from productscene.errors import ProductSceneError
from productscene.library import TokenLibrary

LIBRARY_FOLDER = "category_libraries"
PERSONALITY_FOLDER = "personality_adapters"
IPADAPTER_FOLDER = "ipadapter"
EMBEDDINGS_FOLDER = "embeddings"
_EXTENSIONS = {".safetensors"}


def register(folder: str = LIBRARY_FOLDER) -> None:
    """Add ``folder`` (under ``models_dir``) unless extra_model_paths already did."""
    default = os.path.join(folder_paths.models_dir, folder)
    entry = folder_paths.folder_names_and_paths.get(folder)
    if entry is None:
        folder_paths.folder_names_and_paths[folder] = ([default], set(_EXTENSIONS))
    else:
        paths, exts = entry
        if default not in paths:
            paths.append(default)
        if isinstance(exts, set):
            exts.update(_EXTENSIONS)
        else:
            folder_paths.folder_names_and_paths[folder] = (paths, set(exts) | _EXTENSIONS)


register()
register(PERSONALITY_FOLDER)
register(IPADAPTER_FOLDER)

_HEADER_CACHE: dict[str, tuple[float, int, TokenLibrary | None]] = {}
BROKEN: dict[str, str] = {}  # file name -> why it cannot be read (skipped in every list)


def _names(folder: str) -> list[str]:
    try:
        return list(folder_paths.get_filename_list(folder))
    except KeyError:
        return []


def open_cached(path: str) -> TokenLibrary | None:
    """The library at ``path`` (header only), or None if it is not a readable category library.
    Cached by (mtime, size) so combo lists do not re-read unchanged files. A broken file is
    reported once (with its name and why) in the server log, and never raises."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = os.path.realpath(path)
    hit = _HEADER_CACHE.get(key)
    if hit is not None and hit[0] == st.st_mtime and hit[1] == st.st_size:
        return hit[2]
    lib = None
    if TokenLibrary.is_library(path):
        try:
            lib = TokenLibrary.open(path)
        except Exception as e:  # one bad file must not take the nodes and routes down
            why = str(e) if isinstance(e, ProductSceneError) else f"{type(e).__name__}: {e}"
            BROKEN[os.path.basename(path)] = why
            logging.warning("ProductScene: skipping the broken category library %s: %s", os.path.basename(path), why)
    if lib is not None:
        BROKEN.pop(os.path.basename(path), None)
    _HEADER_CACHE[key] = (st.st_mtime, st.st_size, lib)
    return lib


def list_libraries() -> list[str]:
    """Readable category libraries: files of ``category_libraries`` plus ``.safetensors`` files of
    ``embeddings`` that are category libraries (judged by header). Files that say they are category
    libraries but cannot be read are left out (and reported, see :func:`open_cached`); other
    files of ``category_libraries`` stay listed so that using one gives its own clear error.
    Names are relative to their folder."""
    out = []
    for name in _names(LIBRARY_FOLDER):
        if not name.lower().endswith(".safetensors"):
            continue
        path = folder_paths.get_full_path(LIBRARY_FOLDER, name)
        if path and open_cached(path) is None and TokenLibrary.is_library(path):
            continue
        out.append(name)
    seen = set(out)
    for name in _names(EMBEDDINGS_FOLDER):
        if not name.lower().endswith(".safetensors") or name in seen:
            continue
        path = folder_paths.get_full_path(EMBEDDINGS_FOLDER, name)
        if path and open_cached(path) is not None:
            out.append(name)
            seen.add(name)
    return sorted(out)


def _check_name(name, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ProductSceneError(f"{what}: expected a file name, got {name!r}")
    norm = name.replace("\\", "/")
    if (os.path.isabs(name) or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":")
            or ".." in norm.split("/")):
        raise ProductSceneError(
            f"{what}: {name!r} is not allowed; give a file name inside the models folder "
            f"(no absolute paths, no '..')")
    return name


def resolve(folder: str, name: str, what: str = "library") -> str:
    """Full path of ``name`` in the ComfyUI models folder ``folder``; refuses names that reach
    outside the folder and names that do not exist."""
    _check_name(name, what)
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ProductSceneError(f"{what}: {name!r} was not found in models/{folder}")
    return path


def resolve_library(name: str, what: str = "library") -> str:
    """A library name as listed by :func:`list_libraries` -> full path (category_libraries first,
    then embeddings)."""
    _check_name(name, what)
    for folder in (LIBRARY_FOLDER, EMBEDDINGS_FOLDER):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise ProductSceneError(
        f"{what}: {name!r} was not found in models/{LIBRARY_FOLDER} or models/{EMBEDDINGS_FOLDER}")
