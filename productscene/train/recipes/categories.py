"""The category-library recipe (Category-Wise Generator, SPEC section 1) and its run.

Learns every category's identifier vectors (one ``[C, n, width]`` tensor per text encoder, rows
initialised from each category's init word, :func:`productscene.prompt.init_vectors`) plus ONE
shared LoRA on the UNet, with the mask-guided gate active during training: each batch's product
masks go into a ``CategoryGate`` whose product positions attend the template encoded without the
identifier (as at inference). The noise-prediction MSE is weighted to the background.

:func:`train_category_library` is the whole run (data check, latent cache, resume, training,
licence, summary, library file) shared by the node and the command line; hosts only adapt.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping, Sequence

import torch

from ...attention import AttentionCapture, CategoryGate, SceneAttention
from ...errors import ProductSceneError
from ...library import TokenLibrary, check_family
from ...prompt import DEFAULT_TEMPLATE, PLACEHOLDER, Prompt, category_free_template, check_template, init_vectors
from .. import distributed
from ..datasets import DatasetReport, LatentCache
from ..engine import Phase, TrainResult, loss_graph, training_mode
from ..lora import DEFAULT_TARGETS, LoRA
from ..losses import background_weights, per_sample_weighted_mse, weighted_mse
from ..run import RunOptions, checked_inputs, license_of, run_recipe, warm_latents
from . import DiffusionHost, Encoded, sample_preview


@dataclass
class CategoryConfig:
    template: str = DEFAULT_TEMPLATE
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
    gate_grow_latent_px: int = 0     # the gate's protected area grown by this many latent pixels
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


def draw_batch(source, b: int, t_range: tuple[int, int], generator: torch.Generator) -> dict:
    """``b`` items of ``source`` drawn with ``generator``, their noise and timesteps in ``t_range``:
    ``{"index", "latents", "masks", "noise", "timesteps"}`` (what the recipes' ``batch`` starts from).
    Several ranks (:mod:`..distributed`): the global batch is drawn and this rank's ``b`` rows kept."""
    n = distributed.global_rows(b)
    idx = distributed.local_rows(torch.randint(len(source), (n,), generator=generator), b)
    items = [source.get(int(i)) for i in idx]
    latents = torch.stack([it[0] for it in items])
    masks = torch.stack([it[1] for it in items])
    noise = distributed.local_rows(torch.randn((n,) + tuple(latents.shape[1:]), generator=generator), b)
    t = distributed.local_rows(torch.randint(t_range[0], t_range[1], (n,), generator=generator), b)
    return {"index": idx, "latents": latents, "masks": masks, "noise": noise, "timesteps": t}


def default_init_word(name: str) -> str:
    words = [w for w in re.split(r"[\s_\-/,.&]+", name) if w]
    return words[0].lower() if words else "background"


class CategoryRecipe:
    """Recipe for :class:`~productscene.train.engine.Trainer` (groups ``tokens`` and ``lora``)."""

    def __init__(self, host: DiffusionHost, source, categories: Sequence[str], config: CategoryConfig | None = None,
                 seed: int = 0, initial: Mapping[str, torch.Tensor] | None = None):
        self.host = host
        self.source = source
        self.config = config or CategoryConfig()
        host_targets = getattr(host, "lora_targets", None)  # a DiT host: its joint attention's projections
        if host_targets is not None and tuple(self.config.targets) == DEFAULT_TARGETS:
            self.config = replace(self.config, targets=tuple(host_targets))
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
        # identifier vectors, initialised from each category's init word
        self.init_words = {}
        if initial is None:
            rows = {e: [] for e in self.encoders}
            cache: dict[str, Mapping[str, torch.Tensor]] = {}
            for c in self.categories:
                word = self.config.init_word or default_init_word(c)
                if word not in cache:
                    try:
                        cache[word] = host.token_embeddings(word)
                    except ProductSceneError:  # a word without tokens (e.g. only punctuation)
                        word = "background"
                        cache.setdefault(word, host.token_embeddings(word))
                self.init_words[c] = word
                for e in self.encoders:
                    rows[e].append(init_vectors(cache[word][e].detach().cpu(), n))
            initial = {e: torch.stack(r) for e, r in rows.items()}
        # identifier_c = init_c + shared + (offset_c - mean_k offset_k): the shared part takes what
        # helps every category alike, the centred offsets only what tells categories apart (without
        # it one identifier drifts to be "generally best" and the others follow the data noise)
        self.init = {e: initial[e].detach().float().clone().to(device) for e in self.encoders}
        self.shared = {e: torch.nn.Parameter(torch.zeros(1, *self.init[e].shape[1:], device=device)) for e in self.encoders}
        self.offsets = {e: torch.nn.Parameter(torch.zeros_like(self.init[e])) for e in self.encoders}
        for e, v in self.init.items():
            if tuple(v.shape) != (len(self.categories), n, self.encoders[e]):
                raise ProductSceneError(f"initial: {e} must be [{len(self.categories)}, {n}, {self.encoders[e]}], got {list(v.shape)}")
        self.lora = LoRA(host.unet, rank=self.config.rank, alpha=self.config.alpha, targets=self.config.targets,
                         prefix=host.lora_prefix, seed=seed + 7919, device=device)
        hi = self.config.max_timestep if self.config.max_timestep is not None else host.num_timesteps
        if not 0 <= self.config.min_timestep < hi <= host.num_timesteps:
            raise ProductSceneError(f"timesteps: expected 0 <= min < max <= {host.num_timesteps}, got {self.config.min_timestep}, {hi}")
        self.t_range = (int(self.config.min_timestep), int(hi))
        self.identifier_product_attention: list[float] = []
        self._free: Encoded | None = None

    # -- engine protocol -------------------------------------------------------------------------
    def parameter_groups(self):
        return {"tokens": [self.shared[e] for e in self.encoders] + [self.offsets[e] for e in self.encoders],
                "lora": list(self.lora.parameters())}

    def batch(self, step: int, generator: torch.Generator):
        batch = draw_batch(self.source, int(self.config.batch_size), self.t_range, generator)
        batch["categories"] = torch.tensor([self.labels[int(i)] for i in batch["index"]], dtype=torch.long)
        return batch

    def loss(self, batch, step):
        pred, target, weights, enc, capture, scene = self._forward(batch, self.config.monitor_attention)
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

    def preview(self, generator: torch.Generator, count: int = 4) -> torch.Tensor:
        """The template under the first ``count`` categories' identifiers, drawn from noise (no
        product, so no gate): ``[count, H, W, 3]``, one image per category."""
        cats = torch.arange(min(int(count), len(self.categories)))
        latent = self.source.get(0)[0]
        return sample_preview(self.host, self._encode(cats), (len(cats),) + tuple(latent.shape), generator)

    # -- model calls -----------------------------------------------------------------------------
    def vectors_for(self, categories: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        idx = torch.as_tensor(categories, dtype=torch.long).to(self.host.device)
        rows = {e: self.init[e][idx] + self.shared[e] + (self.offsets[e][idx] - self.offsets[e].mean(0, keepdim=True))
                for e in self.encoders}
        return [{e: rows[e][i] for e in self.encoders} for i in range(len(idx))]

    def free_context(self) -> torch.Tensor:
        """The template encoded without the identifier (``[1, R, C]``), what product positions
        attend: the same for every category, encoded once per run (the identifier never reaches it,
        so it gets no gradient through product positions)."""
        return self._free_prompt().cond

    def _free_prompt(self) -> Encoded:
        if self._free is None:
            with torch.no_grad():
                enc = self.host.encode([Prompt(category_free_template(self.config.template))])
            self._free = Encoded(enc.cond.detach(), enc.pooled.detach() if enc.pooled is not None else None,
                                 enc.rows, enc.context_rows)
        return self._free

    def _category_free_globals(self, enc: Encoded) -> Encoded:
        """``enc`` with its global vector (SDXL's pooled text: it joins the time embedding and so
        reaches every position, product included) taken from the prompt without the identifier, as
        Category Tokens hands it to the sampler: only the gated context carries the category."""
        if enc.pooled is None:
            return enc
        free = self._free_prompt().pooled
        return replace(enc, pooled=free.to(enc.pooled.device).expand(enc.pooled.shape[0], -1))

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        """Every category's identifier ``{encoder: [C, n, width]}`` (detached)."""
        with torch.no_grad():
            return {e: self.init[e] + self.shared[e] + (self.offsets[e] - self.offsets[e].mean(0, keepdim=True))
                    for e in self.encoders}

    def _encode(self, cats: torch.Tensor, memo: dict | None = None):
        """The prompts of ``cats`` encoded: each distinct category once, gathered per sample.
        ``memo`` (evaluation only: the vectors do not change) keeps encodings across calls."""
        uniq, inverse = torch.unique(cats, return_inverse=True)
        todo = [int(c) for c in uniq if memo is None or int(c) not in memo]
        if todo:
            vecs = self.vectors_for(torch.tensor(todo))
            enc = self._category_free_globals(
                self.host.encode([Prompt(self.config.template, {PLACEHOLDER: v}) for v in vecs]))
            if memo is None:
                return enc.select(inverse)
            for i, c in enumerate(todo):
                memo[c] = enc.select(torch.tensor([i]))
        parts = [memo[int(c)] for c in uniq]
        enc = Encoded(torch.cat([p.cond for p in parts]),
                      torch.cat([p.pooled for p in parts]) if parts[0].pooled is not None else None,
                      tuple(p.rows[0] for p in parts), parts[0].context_rows)
        return enc.select(inverse)

    def _forward(self, batch, capture_attention: bool, categories: torch.Tensor | None = None, memo: dict | None = None):
        host = self.host
        dev = host.device
        latents = batch["latents"].to(dev)
        masks = batch["masks"].to(dev)
        noise = batch["noise"].to(dev)
        cats = batch["categories"] if categories is None else categories
        enc = self._encode(cats, memo)
        rows = enc.rows[0][PLACEHOLDER]  # one template: the same rows for every sample
        sigma = host.sigmas(batch["timesteps"].to(dev))
        x = host.add_noise(latents, noise, sigma)
        gate = CategoryGate(masks.detach().float(), self.free_context(), strength=self.config.gate_strength,
                            grow_latent_px=self.config.gate_grow_latent_px)
        scene = SceneAttention().with_gate(gate)
        capture = None
        if capture_attention:
            capture = AttentionCapture({"identifier": rows}, downsample=None)
            scene = scene.with_capture(capture)
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
                 categories: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
        """Per-sample background-weighted noise-prediction loss ``[B]`` with the identifier of
        ``categories`` (gate and LoRA on). Give the same noise and timesteps to compare tokens.
        ``memo``: a dict kept by the caller across calls while the identifiers do not change
        (each category's prompt is then encoded once)."""
        batch = {"latents": latents, "masks": masks, "noise": noise, "timesteps": timesteps, "categories": categories}
        pred, target, weights, *_ = self._forward(batch, False, memo=memo)
        return per_sample_weighted_mse(pred, target.to(pred.device), weights.to(pred.device)).cpu()

    # -- output ----------------------------------------------------------------------------------
    def library_vectors(self) -> dict[str, torch.Tensor]:
        return {e: v.detach().float().cpu() for e, v in self.vectors.items()}

    def write_library(self, path, training: dict | None = None, license: str | None = None) -> str:
        return TokenLibrary.write(path, self.categories, self.library_vectors(), self.family,
                                     init_words=self.init_words, lora=self.lora.comfy_state_dict(),
                                     training=training, license=license)


# ------------------------------------------------------------------------------------ the run
@dataclass
class CategoryRun:
    library: str | None          # the written library; None when the run was cancelled
    result: TrainResult | None   # None when cancelled before the first step (while caching latents)
    report: DatasetReport
    recipe: CategoryRecipe | None
    graph: torch.Tensor          # the loss graph as an IMAGE tensor

    @property
    def cancelled(self) -> bool:
        return self.library is None


def train_category_library(host: DiffusionHost, data, out_path, config: CategoryConfig,
                           options: RunOptions | None = None, *, layout: str = "folder", split: str = "train",
                           checked: DatasetReport | None = None, cache_dir,
                           latent_progress: Callable[[int, int], None] | None = None, license: str | None = None,
                           **fields) -> CategoryRun:
    """The whole category-library run: check the data (once; pass ``checked`` with an opened
    ``data`` set to reuse a report), encode every image's VAE latent once into the cache, train,
    and write the library to ``out_path`` with its licence and training summary. ``options`` (or
    their fields as keywords): :class:`..run.RunOptions`.

    Data problems, an output that cannot be written and an existing library or training state that
    would be replaced (unless ``overwrite`` or a resume) raise before any model work and nothing is
    written. When ``should_stop`` ends the run early the checkpoint is saved and ``library`` is None
    (the host then reports the cancel its way).
    """
    options = RunOptions.of(options, fields)
    ds, report = checked_inputs(data, out_path, options, layout=layout, split=split, checked=checked)
    with training_mode():
        cache = LatentCache(cache_dir, ds, host.encode_images, int(config.resolution), namespace=host.latent_namespace)
        if not warm_latents(cache, latent_progress, options.should_stop, options.ranks):
            return CategoryRun(None, None, report, None, loss_graph([]))
        recipe = CategoryRecipe(host, CachedSource(cache), ds.categories, config, seed=options.seed)
        trained = run_recipe(host, recipe, config.phases(), options, name="categories", lora=recipe.lora,
                             latent_shape=(int(config.batch_size),) + tuple(cache.get(0)[0].shape))
    if trained.cancelled:
        return CategoryRun(None, trained.result, report, recipe, trained.graph)
    summary = trained.summary("categories", options.seed, recipe.describe()["config"], images=len(ds),
                              categories=len(ds.categories), layout=layout, resolution=int(config.resolution),
                              latent_cache={"hits": cache.hits, "misses": cache.misses})
    path = os.fspath(out_path)
    if options.ranks.is_main:  # the other ranks hold the same identifiers and LoRA
        path = recipe.write_library(out_path, training=summary, license=license_of(license, layout))
    return CategoryRun(path, trained.result, report, recipe, trained.graph)
