"""The canvas extension's data routes on the real server: the libraries the Category Tokens node
offers, each library's own categories, and names that try to leave the model folders."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch

from productscene.library import TokenLibrary


def _get(server, path: str, headers: dict | None = None):
    request = urllib.request.Request(server.url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _categories(server, library: str, headers: dict | None = None):
    return _get(server, "/productscene/libraries/categories?library=" + urllib.parse.quote(library), headers)


@pytest.fixture(scope="module")
def libraries(comfy_server):
    server, _client = comfy_server
    folder = os.path.join(server.base_dir, "models", "category_libraries")
    os.makedirs(folder, exist_ok=True)
    TokenLibrary.write(os.path.join(folder, "route_a.safetensors"), ["perfume", "tea"],
                          {"clip_l": torch.zeros(2, 1, 768)}, "sd15")
    TokenLibrary.write(os.path.join(folder, "route_b.safetensors"), ["tools"],
                          {"clip_l": torch.zeros(1, 1, 768), "clip_g": torch.zeros(1, 1, 1280)}, "sdxl")
    names = [f"category {i:04d}" for i in range(5000)]
    os.makedirs(os.path.join(folder, "big"), exist_ok=True)
    TokenLibrary.write(os.path.join(folder, "big", "route_5000.safetensors"), names,
                          {"clip_l": torch.zeros(len(names), 1, 768)}, "sd15")
    # a file that is not a library, and a secret outside every model folder
    with open(os.path.join(folder, "not_a_library.safetensors"), "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    secret = os.path.join(server.base_dir, "secret.safetensors")
    TokenLibrary.write(secret, ["leaked"], {"clip_l": torch.zeros(1, 1, 768)}, "sd15")
    return server, names


def test_libraries_route_lists_libraries_with_family_and_count(libraries):
    server, names = libraries
    status, _headers, body = _get(server, "/productscene/libraries")
    index = json.loads(body)
    assert status == 200
    assert index["route_a.safetensors"] == {"family": "sd15", "count": 2}
    assert index["route_b.safetensors"] == {"family": "sdxl", "count": 1}
    assert index["big/route_5000.safetensors"] == {"family": "sd15", "count": len(names)}
    assert "not_a_library.safetensors" not in index


def test_categories_route_gives_each_librarys_own_categories(libraries):
    server, names = libraries
    status, _h, body = _categories(server, "route_a.safetensors")
    assert status == 200
    assert json.loads(body) == {"library": "route_a.safetensors", "family": "sd15", "count": 2,
                                "categories": ["perfume", "tea"]}
    assert json.loads(_categories(server, "route_b.safetensors")[2])["categories"] == ["tools"]
    status, headers, body = _categories(server, "big/route_5000.safetensors")
    assert status == 200
    assert json.loads(body)["categories"] == names
    # asked again with the ETag it gave: 304, no body
    status, _h, body = _categories(server, "big/route_5000.safetensors", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""


def test_categories_route_follows_a_replaced_library(libraries):
    server, _names = libraries
    folder = os.path.join(server.base_dir, "models", "category_libraries")
    path = os.path.join(folder, "route_c.safetensors")
    TokenLibrary.write(path, ["one"], {"clip_l": torch.zeros(1, 1, 768)}, "sd15")
    _status, headers, body = _categories(server, "route_c.safetensors")
    assert json.loads(body)["categories"] == ["one"]
    TokenLibrary.write(path, ["one", "two"], {"clip_l": torch.zeros(2, 1, 768)}, "sd15")
    status, _h, body = _categories(server, "route_c.safetensors", {"If-None-Match": headers["ETag"]})
    assert status == 200 and json.loads(body)["categories"] == ["one", "two"]


@pytest.mark.parametrize("name", ["../secret.safetensors", "../../secret.safetensors",
                                  "big/../../secret.safetensors", "..\\secret.safetensors"])
def test_categories_route_rejects_names_that_leave_the_model_folders(libraries, name):
    server, _names = libraries
    status, _h, body = _categories(server, name)
    assert status == 400, body
    message = json.loads(body)["error"]
    assert "library" in message and "'..'" in message
    assert b"leaked" not in body


def test_categories_route_rejects_absolute_and_unknown_names(libraries):
    server, _names = libraries
    secret = os.path.join(server.base_dir, "secret.safetensors")
    status, _h, body = _categories(server, secret)
    assert status == 400 and b"leaked" not in body
    assert "absolute" in json.loads(body)["error"]
    for name in ("missing.safetensors", "not_a_library.safetensors", ""):
        status, _h, body = _categories(server, name)
        assert status in (400, 404), (name, status)
        assert "library" in json.loads(body)["error"]
    assert _categories(server, "missing.safetensors")[0] == 404
