"""The real ComfyUI_IPAdapter_plus, loaded through ComfyUI's own custom-node loader, with random
weights of its real "Plus" shapes.

The snapshot is the tarball in ``<an ancestor of the repo>/shared/peers/`` (``PRODUCTSCENE_PEERS``
overrides the folder). :func:`load` unpacks it once into the test base directory's custom_nodes/
and loads it with ``nodes.load_custom_node``; its nodes then sit in ``nodes.NODE_CLASS_MAPPINGS``.

:func:`write_plus_model` writes an IPAdapter "Plus" model file into ComfyUI's ``ipadapter`` model
folder: a ``Resampler`` of the real size (16 queries over 1280-wide CLIP-vision ViT-H states; dim
768 for SD1.5, 1280 for SDXL, depth 4) and one ``to_k_ip``/``to_v_ip`` pair per layer IPAdapter
patches, mapping the family's context width to that layer's width (the real shapes on the full
320-channel UNets). :func:`apply` runs its own ``IPAdapterModelLoader`` and ``IPAdapterEmbeds``
nodes on a model with penultimate CLIP-vision states of the real shape ``[1, 257, 1280]``.
"""
from __future__ import annotations

import asyncio
import functools
import os
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import comfy_env
from .models import init_weights

TARBALL = "ComfyUI_IPAdapter_plus-9d076a3.tar.gz"
CONTEXT_WIDTH = {"sd15": 768, "sd2": 1024, "sdxl": 2048}


def peers_folder() -> Path | None:
    if os.environ.get("PRODUCTSCENE_PEERS"):
        return Path(os.environ["PRODUCTSCENE_PEERS"])
    for parent in comfy_env.REPO_ROOT.parents:
        if (parent / "shared" / "peers" / TARBALL).is_file():
            return parent / "shared" / "peers"
    return None


def skip_reason() -> str | None:
    folder = peers_folder()
    if folder is None or not (folder / TARBALL).is_file():
        return f"the real IPAdapter_plus snapshot ({TARBALL}) is not in any ../shared/peers/ above the repo"
    return None


@functools.cache
def load():
    """ComfyUI's ``nodes`` module with IPAdapter_plus loaded by its own custom-node loader; returns
    (nodes, IPAdapterPlus module)."""
    nodes = comfy_env.import_comfy_nodes()
    target = comfy_env.BASE_DIR / "custom_nodes"
    with tarfile.open(peers_folder() / TARBALL) as tar:
        tar.extractall(target, filter="data")
    folder = target / "ComfyUI_IPAdapter_plus"
    assert asyncio.run(nodes.load_custom_node(str(folder), module_parent="custom_nodes")), "IPAdapter_plus did not load"
    module = sys.modules[nodes.NODE_CLASS_MAPPINGS["IPAdapterEmbeds"].__module__]
    return nodes, module


def patched_keys(family: str) -> list[tuple]:
    """The attn2 keys IPAdapter patches, in the order it numbers its ip layers (read from
    ``ipadapter_execute``): module key ``str(2 * i + 1)`` for the i-th key."""
    if family != "sdxl":
        return ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)]
                + [("middle", 1)])
    keys = [("input", i, t) for i in (4, 5, 7, 8) for t in range(2 if i in (4, 5) else 10)]
    keys += [("output", i, t) for i in range(6) for t in range(2 if i in (3, 4, 5) else 10)]
    return keys + [("middle", 1, t) for t in range(10)]


def layer_width(layers: dict, key: tuple) -> int | None:
    """The inner width of the layer ComfyUI runs a replace at ``key`` on (None: no such layer); its
    middle key (which never fires) gets the middle layer's width, as in a real file."""
    key = ("middle", 0) + tuple(key[2:]) if key[0] == "middle" else key
    attn2 = layers.get(key if len(key) == 3 else key + (0,))
    return None if attn2 is None else attn2.to_k.out_features


def plus_state_dict(family: str, layers: dict, seed: int = 0, vision_width: int = 1280) -> dict[str, torch.Tensor]:
    """Flat ``{"image_proj.*", "ip_adapter.<n>.to_k_ip.weight", ...}`` of random Plus weights;
    ``layers`` is ``{attn2 key: attn2 module}`` of the model it will patch. ``vision_width``: the
    penultimate states' width (ViT-H 1280, ViT-bigG 1664)."""
    _, module = load()
    sdxl = family == "sdxl"
    resampler = sys.modules[module.__package__ + ".image_proj_models"].Resampler(
        dim=1280 if sdxl else CONTEXT_WIDTH[family], depth=4, dim_head=64, heads=20 if sdxl else 12,
        num_queries=16, embedding_dim=vision_width, output_dim=CONTEXT_WIDTH[family], ff_mult=4)
    init_weights(resampler, seed)
    return _with_layers(family, layers, {f"image_proj.{k}": v.contiguous() for k, v in resampler.state_dict().items()},
                        seed)


def linear_state_dict(family: str, layers: dict, seed: int = 0, vision_width: int = 1024) -> dict[str, torch.Tensor]:
    """Random weights of a plain IP-Adapter (its ``ImageProjModel``: 4 tokens from the pooled
    ``image_embeds``, ViT-H 1024 or ViT-bigG 1280 wide) with the same per-layer pairs."""
    _, module = load()
    proj = sys.modules[module.__package__ + ".image_proj_models"].ImageProjModel(
        cross_attention_dim=CONTEXT_WIDTH[family], clip_embeddings_dim=vision_width, clip_extra_context_tokens=4)
    init_weights(proj, seed)
    with torch.no_grad():  # non-trivial norm parameters, so a mix-up of them shows
        proj.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
        proj.norm.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(seed + 2))
    return _with_layers(family, layers, {f"image_proj.{k}": v.contiguous() for k, v in proj.state_dict().items()}, seed)


def _with_layers(family: str, layers: dict, out: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    fallback = min(w for w in (layer_width(layers, k) for k in patched_keys(family)) if w)
    for i, key in enumerate(patched_keys(family)):
        width = layer_width(layers, key) or fallback  # a key that matches no layer never runs
        for name in ("to_k_ip", "to_v_ip"):
            weight = torch.rand(width, CONTEXT_WIDTH[family], generator=g) * 2 - 1
            out[f"ip_adapter.{2 * i + 1}.{name}.weight"] = weight / CONTEXT_WIDTH[family] ** 0.5
    return out


def write_plus_model(family: str, layers: dict, name: str, seed: int = 0, kind: str = "plus",
                     vision_width: int | None = None) -> str:
    """Write the Plus (or, ``kind="linear"``, the plain) model into ComfyUI's ipadapter folder;
    returns the file name to load."""
    import folder_paths

    load()
    folder = folder_paths.get_folder_paths("ipadapter")[0]
    os.makedirs(folder, exist_ok=True)
    make = plus_state_dict if kind == "plus" else linear_state_dict
    extra = {} if vision_width is None else {"vision_width": vision_width}
    save_file(make(family, layers, seed, **extra), os.path.join(folder, name))
    folder_paths.filename_list_cache.pop("ipadapter", None)
    return name


def clip_vision_states(seed: int = 0, shape: tuple = (1, 257, 1280)) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, negative) penultimate hidden states of ViT-H: ``[1, 257, 1280]`` each (or ``shape``:
    ``(1, 1024)`` for ViT-H's pooled ``image_embeds``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 0.1


def load_model(file_name: str):
    nodes, _ = load()
    return nodes.NODE_CLASS_MAPPINGS["IPAdapterModelLoader"]().load_ipadapter_model(file_name)[0]


def apply(model, ipadapter, weight: float = 1.0, seed: int = 0, start_at: float = 0.0, end_at: float = 1.0,
          states: tuple | None = None):
    """``IPAdapterEmbeds`` (its own node) on ``model`` with ``states`` (image, negative) or
    :func:`clip_vision_states` of ``seed``: returns the patched clone."""
    nodes, _ = load()
    pos, neg = states if states is not None else clip_vision_states(seed)
    node = nodes.NODE_CLASS_MAPPINGS["IPAdapterEmbeds"]()
    return node.apply_ipadapter(model, ipadapter, pos, weight, "linear", start_at, end_at, neg_embed=neg)[0]


def write_training_start(path, layers: dict, vision_width: int, *, tokens: int = 16, dim: int = 768, depth: int = 4,
                         heads: int = 12, ff_mult: int = 4, seed: int = 0) -> Path:
    """A 'plus' IP-Adapter file for ANY UNet as IP-Adapter's own training starts one (its
    tutorial_train_plus.py): a perceiver resampler of torch's default initialisation with latents
    ``randn / sqrt(dim)``, and each cross-attention layer's ``to_k_ip``/``to_v_ip`` copied from that
    layer's own text ``to_k``/``to_v``; ``layers`` is ``{attn2 key: attn2 module}`` of the model.
    The keys and format are the released files' (``image_proj.*``, ``ip_adapter.<2i+1>.to_k_ip`` in
    IP-Adapter's processor order, fp16, no metadata). The defaults are ip-adapter-plus_sd15's sizes
    (16 tokens, dim 768, depth 4, 12 heads); ``vision_width`` is the CLIP-vision states' width.
    Written with our own projection class, whose keys the loader checks against IPAdapter_plus's."""
    from productscene.ipadapter import ResamplerProjection, processor_order

    modules = {tuple(k): m for k, m in layers.items()}
    context_dim = next(iter(modules.values())).to_k.weight.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = ResamplerProjection(vision_width, dim, tokens, context_dim, depth, heads, 64, ff_mult)
        with torch.no_grad():
            projection.latents.copy_(torch.randn(1, tokens, dim) / dim ** 0.5)
    tensors = {f"image_proj.{k}": v for k, v in projection.state_dict().items()}
    for i, key in enumerate(processor_order(modules)):
        tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = modules[key].to_k.weight.detach()
        tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = modules[key].to_v.weight.detach()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))
    return path
