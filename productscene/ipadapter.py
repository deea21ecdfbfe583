"""IP-Adapter files as personality adapters. Host-free.

An IP-Adapter file (``ip-adapter_sd15``, ``ip-adapter-plus_sd15``, ``ip-adapter_sdxl_vit-h``,
``ip-adapter-plus_sdxl_vit-h``, ...) has the design of our personality adapter: an image projection
from CLIP-vision features to reference tokens, and one ``to_k_ip``/``to_v_ip`` pair per
cross-attention layer. :class:`IPAdapterPersonality` is a :class:`PersonalityAdapter` whose projection
is the file's, so its tokens go through the same ``ReferenceInjection`` (background only, start/end,
negative reference) as an adapter our trainer writes.

Kinds (recognised by their keys, not their names):

- ``linear`` (``image_proj.proj``, ``image_proj.norm``): the pooled, projected CLIP-vision embedding
  (``image_embeds``: ViT-H 1024, ViT-bigG 1280 wide) -> ``K`` tokens by one linear map and a layer norm.
- ``plus`` (``image_proj.latents`` and a perceiver resampler): the penultimate hidden states
  (ViT-H 1280, ViT-bigG 1664 wide) -> ``K`` learned latents that cross-attend them through
  ``depth`` blocks. Patches of the reference's own product are masked out of that attention.

The ``ip_adapter.<2i+1>.to_k_ip`` pairs are numbered in the order diffusers lists the attention
processors (each transformer block's self-attention is the even number before its cross-attention):
down blocks, up blocks, then the middle block (:func:`processor_order`). The file does not say which
UNet layout it was made for; the pairs map onto the model's own cross-attention layers in that
order (``layers`` of :meth:`IPAdapterPersonality.load`), so a file fits exactly the UNets with its
number of cross-attention layers of its widths (ip-adapter_sd15: SD1.5's 16; the SDXL files: SDXL's
70). Without the model the released layout of the file's family is assumed (:func:`layer_order`).
A fine-tuned file we write also names its layers in the metadata ``layers`` (JSON ``{key: inner
width}`` in processor order), so it loads without the model whatever its layout.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch
import torch.nn.functional as F

from .errors import ProductSceneError
from .files import load_tensors, read_header, save_safetensors_atomic
from .library import FAMILIES
from .personality import PersonalityAdapter, layer_key, layer_name

UNSUPPORTED = {  # key present -> the IP-Adapter variant it marks, which needs more than CLIP vision
    "image_proj.proj.3.weight": "'full' (MLP projection, ip-adapter-full-face)",
    "image_proj.perceiver_resampler.proj_in.weight": "FaceID Plus",
    "ip_adapter.0.to_q_lora.down.weight": "FaceID",
    "image_proj.proj.2.weight": "FaceID / portrait",
}


def processor_order(keys) -> list[tuple]:
    """Cross-attention layer keys (``("input", 4, 0)``, ...) in IP-Adapter's attention-processor
    order: down (input) blocks, up (output) blocks, then the middle block, each by block and
    transformer index. The i-th key is the file's ``ip_adapter.<2i+1>`` pair."""
    rank = {"input": 0, "output": 1, "middle": 2}
    keys = [tuple(k) for k in keys]
    unknown = [k for k in keys if k[0] not in rank]
    if unknown:
        raise ProductSceneError(f"model: cross-attention layer {unknown[0]} is in no input, output or middle block")
    return sorted(keys, key=lambda k: (rank[k[0]], int(k[1]), int(k[2])))


def layer_order(family: str) -> list[tuple]:
    """The layer keys of the family's released IP-Adapter files (the full SD1.5 / SDXL UNet), in
    the order of the file's ``ip_adapter.<2i+1>`` pairs."""
    if family in ("sd15", "sd2"):
        return ([("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("output", i, 0) for i in range(3, 12)]
                + [("middle", 0, 0)])
    if family == "sdxl":
        keys = [("input", i, t) for i in (4, 5, 7, 8) for t in range(2 if i in (4, 5) else 10)]
        keys += [("output", i, t) for i in range(6) for t in range(10 if i < 3 else 2)]
        return keys + [("middle", 0, t) for t in range(10)]
    raise ProductSceneError(f"adapter: IP-Adapter files exist for sd15 and sdxl, not {family!r}")


def is_ipadapter(path) -> bool:
    """Whether the file's keys are an IP-Adapter's (header only)."""
    try:
        _, index = read_header(path)
    except (ProductSceneError, OSError):
        return False
    return "ip_adapter.1.to_k_ip.weight" in index and any(k.startswith("image_proj.") for k in index)


class LinearProjection(torch.nn.Module):
    """Pooled embedding ``[B, D]`` -> ``[B, K, C]``."""

    def __init__(self, embedding_dim: int, tokens: int, context_dim: int):
        super().__init__()
        self.n_tokens, self.context_dim = tokens, context_dim
        self.proj = torch.nn.Linear(embedding_dim, tokens * context_dim)
        self.norm = torch.nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor, keep=None) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.n_tokens, self.context_dim))


class _LatentAttention(torch.nn.Module):
    """Latents attend the image states and themselves (one perceiver block's attention)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = torch.nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((self.norm1(x), latents), dim=1)).chunk(2, dim=-1)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class ResamplerProjection(torch.nn.Module):
    """Hidden states ``[B, N, D]`` -> ``[B, K, C]``: ``K`` latents through ``depth`` blocks of
    attention (to the states and the latents) and a feed-forward, each added to the latents."""

    def __init__(self, embedding_dim: int, dim: int, tokens: int, context_dim: int, depth: int, heads: int,
                 dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.zeros(1, tokens, dim))
        self.proj_in = torch.nn.Linear(embedding_dim, dim)
        self.proj_out = torch.nn.Linear(dim, context_dim)
        self.norm_out = torch.nn.LayerNorm(context_dim)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList([
            _LatentAttention(dim, heads, dim_head),
            torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim * ff_mult, bias=False),
                                torch.nn.GELU(), torch.nn.Linear(dim * ff_mult, dim, bias=False))])
            for _ in range(depth))

    def forward(self, states: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj_in(states)
        latents = self.latents.expand(x.shape[0], -1, -1)
        mask = None
        if keep is not None:  # the latents themselves are always attended
            mask = torch.cat([keep.to(x.device), keep.new_ones(keep.shape[0], latents.shape[1]).to(x.device)], dim=1)
            mask = mask[:, None, None, :]
        for attention, feed_forward in self.layers:
            latents = attention(x, latents, mask) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def _family_of(context_dim: int, base: str) -> str:
    for family, widths in FAMILIES.items():
        if sum(widths.values()) == context_dim and family in ("sd15", "sdxl"):
            return family
    raise ProductSceneError(f"{base}: an IP-Adapter for a {context_dim}-wide context; supported are SD1.5 (768) "
                            "and SDXL (2048)")


class IPAdapterPersonality(PersonalityAdapter):
    """A personality adapter made of an IP-Adapter file's weights (see the module docstring)."""

    def __init__(self, family: str, kind: str, projection: torch.nn.Module, vision_width: int,
                 layers: Mapping[str, int], tokens: int, training: dict | None = None):
        super().__init__(family, vision_width, layers, tokens, training)
        del self.queries, self.proj_in, self.norm_out  # the file's projection replaces ours
        self.kind = kind
        self.projection = projection
        self.vision_output = "image_embeds" if kind == "linear" else "penultimate_hidden_states"

    def check_states(self, states: torch.Tensor, what: str = "clip_vision") -> None:
        want = 2 if self.kind == "linear" else 3
        shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        if not isinstance(states, torch.Tensor) or states.ndim != want:
            raise ProductSceneError(f"{what}: expected CLIP-vision {self.vision_output} with {want} dimensions, got {shape}")
        if states.shape[-1] != self.vision_width:
            encoder = {1024: "ViT-H", 1280: "ViT-H" if self.kind == "plus" else "ViT-bigG", 1664: "ViT-bigG"}
            raise ProductSceneError(
                f"{what}: this CLIP vision model gives {states.shape[-1]}-wide {self.vision_output}, but the "
                f"IP-Adapter expects {self.vision_width}-wide ones; use the "
                f"{encoder.get(self.vision_width, 'matching')} CLIP vision model it was trained with")

    def tokens(self, states: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.check_states(states)
        dtype = next(self.projection.parameters()).dtype
        return self.projection(states.to(dtype), keep if self.kind == "plus" else None)

    def save(self, path, training: dict | None = None) -> str:
        """A fine-tuned adapter keeps the IP-Adapter keys (so IPAdapter_plus loads it too), float32,
        with the metadata ``productscene.format = ipadapter_personality`` and ``training``."""
        tensors = {f"image_proj.{k}": v.detach().float().contiguous().cpu()
                   for k, v in self.projection.state_dict().items()}
        projections = self.projections()
        order = processor_order(projections)
        for i, key in enumerate(order):
            to_k, to_v = projections[key]
            tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = to_k.weight.detach().float().contiguous().cpu()
            tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = to_v.weight.detach().float().contiguous().cpu()
        meta = {"family": self.family, "kind": self.kind,
                "layers": json.dumps({layer_name(k): self.layer_widths[layer_name(k)] for k in order}),
                "training": json.dumps(training if training is not None else self.training_summary)}
        save_safetensors_atomic(tensors, path, meta, kind="ipadapter_personality", version=1)
        return os.fspath(path)

    @classmethod
    def load(cls, path, layers: Mapping[tuple, int] | None = None, family: str | None = None,
             what: str = "adapter") -> "IPAdapterPersonality":
        """The file as an adapter. ``layers``: ``{key: inner width}`` of the model it will act on;
        the file's pairs then map onto those layers in processor order, and a file with another
        number of pairs is refused. ``family``: the model's family (a file for another is refused
        first). ``what``: the input named in errors."""
        base = os.path.basename(os.fspath(path))
        file_family, _ = inspect_file(path, what)
        if family is not None and family != file_family:
            raise ProductSceneError(f"{what}: {base} is an IP-Adapter for {file_family}, but the model is {family}")
        meta, _ = read_header(path)
        tensors = load_tensors(path)
        context_dim = tensors["ip_adapter.1.to_k_ip.weight"].shape[1]
        pairs = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("ip_adapter.")})
        if layers is not None:
            order, layout = processor_order(layers), "the model has"
        elif meta.get("layers"):
            try:
                order, layout = processor_order(layer_key(n) for n in json.loads(meta["layers"])), "its metadata names"
            except (ValueError, TypeError, AttributeError):
                raise ProductSceneError(f"{what}: {base} has malformed 'layers' metadata") from None
        else:
            order, layout = layer_order(file_family), f"{file_family}'s released IP-Adapters have"
        if pairs != [2 * i + 1 for i in range(len(order))]:
            raise ProductSceneError(
                f"{what}: {base} holds {len(pairs)} to_k_ip/to_v_ip pairs, but {layout} {len(order)} cross-attention "
                f"layers; an IP-Adapter fits only a UNet of the layout it was made for (ip-adapter_sd15: SD1.5's "
                f"16 layers, the SDXL files: SDXL's 70)")
        widths = {layer_name(key): tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"].shape[0]
                  for i, key in enumerate(order)}
        proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
        if "latents" in proj:
            kind = "plus"
            tokens, dim = proj["latents"].shape[1:]
            vision_width = proj["proj_in.weight"].shape[1]
            depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
            heads = proj["layers.0.0.to_q.weight"].shape[0] // 64
            ff_mult = proj["layers.0.1.1.weight"].shape[0] // dim
            projection = ResamplerProjection(vision_width, dim, tokens, context_dim, depth, heads, 64, ff_mult)
        elif "proj.weight" in proj and "norm.weight" in proj:
            kind = "linear"
            vision_width = proj["proj.weight"].shape[1]
            tokens = proj["proj.weight"].shape[0] // context_dim
            projection = LinearProjection(vision_width, tokens, context_dim)
        else:
            raise ProductSceneError(f"{what}: {base} has an image projection of an unknown IP-Adapter kind")
        try:
            training = json.loads(meta.get("training") or "null") or {"source": "ip-adapter", "kind": kind, "file": base}
        except ValueError:
            raise ProductSceneError(f"{base}: malformed 'training' metadata") from None
        adapter = cls(file_family, kind, projection, int(vision_width), widths, int(tokens), training)
        expected = projection.state_dict()
        if set(expected) != set(proj) or any(proj[k].shape != v.shape for k, v in expected.items()):
            raise ProductSceneError(f"{what}: {base}'s image projection does not have the shapes of an IP-Adapter "
                                    f"{kind} projection")
        projection.load_state_dict({k: v.float() for k, v in proj.items()})
        with torch.no_grad():
            for i, key in enumerate(order):
                to_k, to_v = adapter.projections()[key]
                to_k.weight.copy_(tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"].float())
                to_v.weight.copy_(tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"].float())
        return adapter


def inspect_file(path, what: str = "adapter") -> tuple[str, str]:
    """``(family, kind)`` of an IP-Adapter file from its header alone; raises for a file that is no
    IP-Adapter, a variant that needs more than CLIP vision, or a context width of no family."""
    base = os.path.basename(os.fspath(path))
    _, index = read_header(path)
    for key, variant in UNSUPPORTED.items():
        if key in index:
            raise ProductSceneError(f"{what}: {base} is an IP-Adapter {variant} file; Personality Reference takes "
                                    "the plain and the 'plus' IP-Adapter files (CLIP vision only)")
    if "ip_adapter.1.to_k_ip.weight" not in index or not any(k.startswith("image_proj.") for k in index):
        raise ProductSceneError(f"{what}: {base} is not an IP-Adapter file (no ip_adapter.1.to_k_ip.weight and "
                                "image_proj.* tensors)")
    shape = index["ip_adapter.1.to_k_ip.weight"][1]
    family = _family_of(int(shape[-1]), f"{what}: {base}")
    return family, "plus" if "image_proj.latents" in index else "linear"


def load_adapter(path) -> PersonalityAdapter:
    """Our personality adapter file or an IP-Adapter file (told apart by their keys)."""
    return IPAdapterPersonality.load(path) if is_ipadapter(path) else PersonalityAdapter.load(path)
