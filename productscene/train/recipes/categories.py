"""The category-library recipe (Category-Wise Generator, SPEC section 1).

Learns every category's identifier vectors (one ``[C, n, width]`` tensor per text encoder, rows
initialised from a word's token embedding) plus ONE shared LoRA on the UNet, with the mask-guided
gate active during training: each batch's product masks go into a ``CategoryGate`` so the
identifier never attends to product pixels. The noise-prediction MSE is weighted to the
background. The result is written as a category library (``productscene.library``).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch

from ...attention import AttentionCapture, CategoryGate, SceneAttention
from ...errors import ProductSceneError
from ...library import CategoryLibrary, check_family
from ...prompt import PLACEHOLDER, check_template
from ..engine import Phase
from ..lora import DEFAULT_TARGETS, LoRA
from ..losses import background_weights, per_sample_weighted_mse, weighted_mse
from . import DiffusionHost, Encoded

BG60K_LICENSE = ("Trained on BG60k, which is licensed for academic research use only; these weights "
                 "inherit that restriction.")


@dataclass
class CategoryConfig:
    template: str = "a product photo on a {category} background"
    vectors_per_token: int = 1
    rank: int = 4
    alpha: float | None = None
    targets: tuple = DEFAULT_TARGETS
    batch_size: int = 2
    resolution: int = 512            # training images are scaled and centre-cropped to this square
    steps: int = 1000
    lr_tokens: float = 5e-3
    lr_lora: float = 1e-4
    token_warmup_steps: int = 0      # first steps train only the identifiers (then identifiers + LoRA)
    product_weight: float = 0.1      # loss weight on product pixels (background = 1)
    gate_strength: float = 1.0
    gate_grow: int = 0
    min_timestep: int = 0
    max_timestep: int | None = None  # exclusive; None = the model's number of timesteps
    init_word: str | None = None     # one word for every category; None = each name's first word
    monitor_attention: bool = False  # capture the identifier's attention and log its mass on product pixels

    def __post_init__(self):
        check_template(self.template)
        if int(self.resolution) < 64 or int(self.resolution) % 64:
            raise ProductSceneError(f"resolution: expected a multiple of 64 (e.g. 512), got {self.resolution}")
        for name in ("vectors_per_token", "rank", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ProductSceneError(f"{name}: expected 1 or more, got {getattr(self, name)}")
        if int(self.steps) < 1:
            raise ProductSceneError(f"steps: expected 1 or more, got {self.steps}")
        for name in ("lr_tokens", "lr_lora"):
            if not float(getattr(self, name)) > 0:
                raise ProductSceneError(f"{name}: expected a learning rate > 0, got {getattr(self, name)}")

    def phases(self) -> list[Phase]:
        warm = min(max(int(self.token_warmup_steps), 0), int(self.steps))
        joint = Phase("tokens+lora", int(self.steps) - warm,
                      {"tokens": float(self.lr_tokens), "lora": float(self.lr_lora)}, weight_decay={"tokens": 0.0})
        if not warm:
            return [joint]
        return [Phase("tokens", warm, {"tokens": float(self.lr_tokens)}, weight_decay={"tokens": 0.0}), joint]


class MemorySource:
    """Latents held in memory: ``latents [N,C,h,w]``, product ``masks [N,h,w]`` (latent size),
    ``labels`` (category name of each item)."""

    def __init__(self, latents: torch.Tensor, masks: torch.Tensor, labels: Sequence[str]):
        if len(latents) != len(masks) or len(latents) != len(labels):
            raise ProductSceneError("source: latents, masks and labels must have the same length")
        self.latents, self.masks, self.labels = latents, masks, list(labels)

    def __len__(self):
        return len(self.labels)

    def get(self, i):
        return self.latents[i].float(), self.masks[i].float()

    def category_of(self, i) -> str:
        return self.labels[i]


class CachedSource:
    """A :class:`~productscene.train.datasets.LatentCache` as a sample source (lazy, on disk)."""

    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache.dataset)

    def get(self, i):
        return self.cache.get(i)

    def category_of(self, i) -> str:
        return self.cache.dataset[i].category


def default_init_word(name: str) -> str:
    words = [w for w in re.split(r"[\s_\-/,.&]+", name) if w]
    return words[0].lower() if words else "background"


class CategoryRecipe:
    """Recipe for :class:`~productscene.train.engine.Trainer` (groups ``tokens`` and ``lora``)."""

    def __init__(self, host: DiffusionHost, source, categories: Sequence[str], config: CategoryConfig | None = None,
                 seed: int = 0, init_vectors: Mapping[str, torch.Tensor] | None = None):
        self.host = host
        self.source = source
        self.config = config or CategoryConfig()
        self.categories = list(categories)
        if not self.categories:
            raise ProductSceneError("categories: expected at least one category to train")
        self.family = host.family
        self.encoders = dict(check_family(self.family))
        if {k: int(v) for k, v in host.encoders.items()} != self.encoders:
            raise ProductSceneError(f"model: text encoders {dict(host.encoders)} do not match family {self.family!r}")
        self._cat_index = {c: i for i, c in enumerate(self.categories)}
        self.labels = []
        unknown = set()
        for i in range(len(source)):
            c = source.category_of(i)
            if c not in self._cat_index:
                unknown.add(c)
            self.labels.append(self._cat_index.get(c, -1))
        if unknown:
            raise ProductSceneError(f"data: categories {sorted(unknown)[:10]} are not among the categories being trained")
        n = int(self.config.vectors_per_token)
        device = host.device
        # identifier vectors, initialised from each category's word
        self.init_words = {}
        if init_vectors is None:
            rows = {e: [] for e in self.encoders}
            cache: dict[str, Mapping[str, torch.Tensor]] = {}
            for c in self.categories:
                word = self.config.init_word or default_init_word(c)
                emb = cache.get(word)
                if emb is None:
                    emb = host.token_vectors(word)
                    if any(v.shape[0] == 0 for v in emb.values()):
                        word, emb = "background", host.token_vectors("background")
                    cache[word] = emb
                self.init_words[c] = word
                for e in self.encoders:
                    v = emb[e].detach().float().cpu()
                    v = v[:n] if v.shape[0] >= n else torch.cat([v, v[-1:].expand(n - v.shape[0], -1)])
                    rows[e].append(v)
            init_vectors = {e: torch.stack(r) for e, r in rows.items()}
        # identifier_c = init_c + shared + (offset_c - mean_k offset_k): the shared part takes what
        # helps every category alike, the centred offsets only what tells categories apart (without
        # it one identifier drifts to be "generally best" and the others follow the data noise)
        self.init = {e: init_vectors[e].detach().float().clone().to(device) for e in self.encoders}
        self.shared = {e: torch.nn.Parameter(torch.zeros(1, *self.init[e].shape[1:], device=device)) for e in self.encoders}
        self.offsets = {e: torch.nn.Parameter(torch.zeros_like(self.init[e])) for e in self.encoders}
        for e, v in self.init.items():
            if tuple(v.shape) != (len(self.categories), n, self.encoders[e]):
                raise ProductSceneError(f"init_vectors: {e} must be [{len(self.categories)}, {n}, {self.encoders[e]}], got {list(v.shape)}")
        self.lora = LoRA(host.unet, rank=self.config.rank, alpha=self.config.alpha, targets=self.config.targets,
                         prefix=host.lora_prefix, seed=seed + 7919, device=device)
        hi = self.config.max_timestep if self.config.max_timestep is not None else host.num_timesteps
        if not 0 <= self.config.min_timestep < hi <= host.num_timesteps:
            raise ProductSceneError(f"timesteps: expected 0 <= min < max <= {host.num_timesteps}, got {self.config.min_timestep}, {hi}")
        self.t_range = (int(self.config.min_timestep), int(hi))
        self.identifier_product_attention: list[float] = []

    # -- engine protocol -------------------------------------------------------------------------
    def parameter_groups(self):
        return {"tokens": [self.shared[e] for e in self.encoders] + [self.offsets[e] for e in self.encoders],
                "lora": list(self.lora.parameters())}

    def batch(self, step: int, generator: torch.Generator):
        b = int(self.config.batch_size)
        idx = torch.randint(len(self.source), (b,), generator=generator)
        items = [self.source.get(int(i)) for i in idx]
        latents = torch.stack([it[0] for it in items])
        masks = torch.stack([it[1] for it in items])
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(self.t_range[0], self.t_range[1], (b,), generator=generator)
        cats = torch.tensor([self.labels[int(i)] for i in idx], dtype=torch.long)
        return {"latents": latents, "masks": masks, "noise": noise, "timesteps": t, "categories": cats}

    def loss(self, batch, step):
        pred, target, weights, enc, capture, scene = self._forward(batch, self.config.monitor_attention, grad=True)
        loss = weighted_mse(pred, target, weights)
        logs = {}
        if capture is not None:
            mass = self.product_attention(capture, scene, batch["masks"].shape[-2:])
            self.identifier_product_attention.append(mass)
            logs["identifier_product_attention"] = mass
            capture.clear()
        return loss, logs

    def extra_state(self):
        return {f"init.{e}": v for e, v in self.init.items()}

    def load_extra_state(self, state):
        for e in self.encoders:
            if f"init.{e}" in state:
                self.init[e] = state[f"init.{e}"].float().to(self.host.device)

    def describe(self) -> dict:
        cfg = asdict(self.config)
        cfg["targets"] = list(cfg["targets"])
        return {"recipe": "categories", "family": self.family, "categories": len(self.categories), "config": cfg}

    # -- model calls -----------------------------------------------------------------------------
    def vectors_for(self, categories: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        idx = torch.as_tensor(categories, dtype=torch.long).to(self.host.device)
        rows = {e: self.init[e][idx] + self.shared[e] + (self.offsets[e][idx] - self.offsets[e].mean(0, keepdim=True))
                for e in self.encoders}
        return [{e: rows[e][i] for e in self.encoders} for i in range(len(idx))]

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        """Every category's identifier ``{encoder: [C, n, width]}`` (detached)."""
        with torch.no_grad():
            return {e: self.init[e] + self.shared[e] + (self.offsets[e] - self.offsets[e].mean(0, keepdim=True))
                    for e in self.encoders}

    def _forward(self, batch, capture_attention: bool, grad: bool, categories: torch.Tensor | None = None):
        host = self.host
        dev = host.device
        latents = batch["latents"].to(dev)
        masks = batch["masks"].to(dev)
        noise = batch["noise"].to(dev)
        cats = batch["categories"] if categories is None else categories
        # encode each distinct category once, then gather per sample
        uniq, inverse = torch.unique(cats, return_inverse=True)
        enc = host.encode(self.config.template, self.vectors_for(uniq))
        if len(uniq) != len(cats):
            inv = inverse.to(enc.cond.device)
            enc = Encoded(enc.cond[inv], enc.pooled[inv] if enc.pooled is not None else None,
                          enc.rows, enc.context_rows)
        sigma = host.sigmas(batch["timesteps"].to(dev))
        x = host.add_noise(latents, noise, sigma)
        gate = CategoryGate(masks.detach().float().cpu(), enc.rows, enc.context_rows,
                            strength=self.config.gate_strength, grow=self.config.gate_grow)
        scene = SceneAttention().with_gate(gate)
        capture = None
        if capture_attention:
            capture = AttentionCapture({"identifier": enc.rows}, downsample=None)
            scene = scene.with_capture(capture)
        with self.lora.attached():
            pred = host.predict_noise(x, sigma, enc, scene)
        weights = background_weights(masks, latents.shape[-2:], 1.0, self.config.product_weight)
        return pred, noise, weights, enc, capture, scene

    @staticmethod
    def product_attention(capture: AttentionCapture, scene: SceneAttention, latent_hw) -> float:
        """Largest attention weight the identifier gives any product position in any captured layer
        (0.0 exactly when the gate holds)."""
        gate = scene.gates[0]
        worst = 0.0
        for amap in capture.layer_maps("identifier"):
            b, h, w = amap.shape
            product = gate.product_queries((h, w), tuple(int(s) for s in latent_hw), amap.device)
            product = product.expand(b, -1) if product.shape[0] == 1 else product
            vals = amap.detach().flatten(1)[product]
            if vals.numel():
                worst = max(worst, float(vals.abs().max()))
        return worst

    @torch.no_grad()
    def evaluate(self, latents: torch.Tensor, masks: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 categories: torch.Tensor) -> torch.Tensor:
        """Per-sample background-weighted noise-prediction loss ``[B]`` with the identifier of
        ``categories`` (gate and LoRA on). Give the same noise and timesteps to compare tokens."""
        batch = {"latents": latents, "masks": masks, "noise": noise, "timesteps": timesteps, "categories": categories}
        pred, target, weights, *_ = self._forward(batch, False, grad=False)
        return per_sample_weighted_mse(pred, target.to(pred.device), weights.to(pred.device)).cpu()

    # -- output ----------------------------------------------------------------------------------
    def library_vectors(self) -> dict[str, torch.Tensor]:
        return {e: v.detach().float().cpu() for e, v in self.vectors.items()}

    def write_library(self, path, training: dict | None = None, license: str | None = None) -> str:
        return CategoryLibrary.write(path, self.categories, self.library_vectors(), self.family,
                                     init_words=self.init_words, lora=self.lora.comfy_state_dict(),
                                     training=training, license=license)
