"""The pack loads through ComfyUI's own custom-node loader from a folder whose name is not the
repo's, and registers every node declared in nodes/*.py (found by reading the source, so new node
modules are picked up without touching this test) plus its web directory."""
import asyncio
import logging
import os
import re

import pytest

from devkit import comfy_env

NODE_ID = re.compile(r"""node_id\s*=\s*["']([^"']+)["']""")


def declared_node_ids() -> dict[str, str]:
    """node_id -> file, from the text of nodes/*.py (independent of importing them)."""
    ids = {}
    for path in sorted((comfy_env.REPO_ROOT / "nodes").glob("*.py")):
        for node_id in NODE_ID.findall(path.read_text(encoding="utf-8")):
            assert node_id not in ids, f"node id {node_id} declared twice: {ids[node_id]} and {path.name}"
            ids[node_id] = path.name
    return ids


def test_declared_ids_are_found():
    ids = declared_node_ids()
    assert "ProductSceneProductMask" in ids  # the regex reads the real declarations
    assert all(i.startswith("ProductScene") for i in ids), ids


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, comfy_nodes):
    folder = tmp_path_factory.mktemp("cn") / "custom_nodes" / "some_other_name"
    folder.parent.mkdir()
    folder.symlink_to(comfy_env.REPO_ROOT, target_is_directory=True)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        ok = asyncio.run(comfy_nodes.load_custom_node(str(folder), module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(handler)
    return ok, folder, "\n".join(records)


def test_comfyui_loader_registers_every_declared_node(loaded, comfy_nodes):
    ok, folder, log = loaded
    assert folder.name != comfy_env.REPO_ROOT.name
    assert ok is True, f"ComfyUI failed to load the pack:\n{log}"
    ids = declared_node_ids()
    missing = sorted(set(ids) - set(comfy_nodes.NODE_CLASS_MAPPINGS))
    assert not missing, f"declared but not registered: {missing}\n{log}"
    for node_id in ids:
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.some_other_name"
        assert cls.__module__.startswith(str(folder).replace(".", "_x_") + ".nodes."), cls.__module__


def test_web_directory_is_registered(loaded, comfy_nodes):
    ok, folder, _ = loaded
    assert ok is True
    web = comfy_nodes.EXTENSION_WEB_DIRS.get("some_other_name")
    assert web is not None, comfy_nodes.EXTENSION_WEB_DIRS
    assert os.path.samefile(web, comfy_env.REPO_ROOT / "js")


def test_running_server_lists_every_declared_node(comfy_server):
    server, client = comfy_server
    info = client.object_info()
    ids = declared_node_ids()
    missing = sorted(set(ids) - set(info))
    assert not missing, f"not in /object_info: {missing}\n{server.log_tail(60)}"
    for node_id in ids:
        assert info[node_id]["python_module"] == f"custom_nodes.{server.pack_name}"
    # the server log must not report our pack as failed
    failures = [line for line in server.log_tail(2000).splitlines()
                if ("IMPORT FAILED" in line or "Cannot import" in line) and server.pack_name in line]
    assert not failures, failures


def test_running_server_serves_the_web_extension(comfy_server):
    server, client = comfy_server
    extensions = client.extensions()
    ours = sorted(e for e in extensions if e.startswith(f"/extensions/{server.pack_name}/"))
    expected = sorted(f"/extensions/{server.pack_name}/{p.relative_to(comfy_env.REPO_ROOT / 'js').as_posix()}"
                      for p in (comfy_env.REPO_ROOT / "js").rglob("*.js"))
    assert ours == expected


def test_core_has_one_identity_across_entry_points(loaded, comfy_nodes):
    """The core is one module tree whichever way it is reached (ComfyUI's loader, the test's own
    import, the command line): an error raised in the core is caught as the same class in a node,
    and no second copy of the core exists under the pack's package name."""
    import sys

    import torch

    import productscene_cli.comfyui
    import productscene.errors
    from productscene.prompt import CategoryTokens

    ok, folder, _ = loaded
    assert ok is True
    pack_name = str(folder).replace(".", "_x_")
    assert not [m for m in sys.modules if m.startswith(pack_name + ".productscene")]
    node = comfy_nodes.NODE_CLASS_MAPPINGS["ProductSceneMaskedCategoryAttention"]
    with pytest.raises(productscene.errors.ProductSceneError, match="^category_tokens:"):
        node.execute(model=None, product_mask=torch.ones(1, 8, 8), category_tokens=object(),
                     strength=1.0, grow_latent_px=0, lora_strength=0.0)
    host = sys.modules[node.__module__.rsplit(".", 1)[0] + ".host"]
    assert host.ProductSceneError is productscene.errors.ProductSceneError
    assert sys.modules[node.__module__].CategoryTokens is CategoryTokens
    # the command line's pack import binds the same core
    adapter = productscene_cli.comfyui.load_host_adapter(str(comfy_env.COMFYUI_DIR))
    assert adapter.ProductSceneError is productscene.errors.ProductSceneError
