"""The personality-adapter recipe (Personality-Wise Generator, SPEC section 2) and its run.

Self-supervised: the reference for a training image is that same image's background (its product
filled with CLIP's mean colour) under augmentation (random resized crop, horizontal flip, mild
brightness and saturation jitter), so the adapter learns to carry style, not to copy pixels. Only
the adapter (its projection and its per-layer to_k/to_v) trains; the UNet and both encoders are
frozen. An IP-Adapter file's image projection (a deep resampler, learned on millions of images) is
a group of its own at ``lr x projection_lr_scale`` (0.01 by default: nearly kept, while its layers'
to_k_ip/to_v_ip adapt at ``lr``): at the same rate a catalogue's run bends it and a style's margin
is lost (tests/test_personality_learning.py has the measurements). The prompt is one
category-agnostic sentence, so the reference is the only way style reaches the model. The reference
acts on background positions only (as at inference); the noise-prediction MSE is weighted to the
background.

The CLIP-vision features are computed every step from a fresh augmentation (CLIP vision is frozen
and small beside the UNet), so no feature cache grows with the data set.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ...attention import SceneAttention
from ...errors import ProductSceneError
from ...ipadapter import IPAdapterPersonality
from ...personality import DEFAULT_TOKENS, PersonalityAdapter, neutral_fill, patch_keep
from ...prompt import Prompt
from .. import distributed
from ..datasets import DatasetReport, LatentCache
from ..engine import Phase, TrainResult, loss_graph, training_mode
from ..losses import background_weights, per_sample_weighted_mse, weighted_mse
from . import DiffusionHost, Encoded, sample_preview
from ..run import RunOptions, checked_inputs, license_of, run_recipe, warm_latents
from .categories import draw_batch

VisionEncoder = Callable[[torch.Tensor], torch.Tensor]  # images [B, H, W, 3] -> penultimate states [B, N, W]


@dataclass
class PersonalityConfig:
    tokens: int = DEFAULT_TOKENS
    prompt: str = "a product photo"
    batch_size: int = 2
    resolution: int = 512
    steps: int = 1000
    lr: float = 1e-4
    product_weight: float = 0.0      # loss weight on product pixels (background = 1)
    min_timestep: int = 0
    max_timestep: int | None = None  # exclusive; None = the model's number of timesteps
    crop_scale: float = 0.6          # random resized crop keeps between this and all of each side
    flip: float = 0.5
    jitter: float = 0.1              # brightness and saturation factors drawn from 1 +- jitter
    projection_lr_scale: float = 0.01  # an IP-Adapter file's projection trains at lr x this (its own group)

    def __post_init__(self):
        if int(self.resolution) < 64 or int(self.resolution) % 64:
            raise ProductSceneError(f"resolution: expected a multiple of 64 (e.g. 512), got {self.resolution}")
        for name in ("tokens", "batch_size", "steps"):
            if int(getattr(self, name)) < 1:
                raise ProductSceneError(f"{name}: expected 1 or more, got {getattr(self, name)}")
        if not float(self.lr) > 0:
            raise ProductSceneError(f"lr: expected a learning rate > 0, got {self.lr}")
        if not 0 < float(self.projection_lr_scale) <= 1:
            raise ProductSceneError(f"projection_lr_scale: expected a factor above 0 and at most 1, got {self.projection_lr_scale}")
        if not 0.1 <= float(self.crop_scale) <= 1.0:
            raise ProductSceneError(f"crop_scale: expected 0.1 to 1, got {self.crop_scale}")
        if not 0.0 <= float(self.flip) <= 1.0 or not 0.0 <= float(self.jitter) < 1.0:
            raise ProductSceneError(f"flip/jitter: expected a probability and a factor below 1, got {self.flip}, {self.jitter}")
        if not str(self.prompt).strip():
            raise ProductSceneError("prompt: expected a category-agnostic sentence, e.g. 'a product photo'")

    def phases(self, groups: Sequence[str] = ("adapter",)) -> list[Phase]:
        """One phase training ``groups`` (:meth:`PersonalityRecipe.parameter_groups`' names): the
        adapter at ``lr``, an IP-Adapter file's projection (group ``projection``) at ``lr x projection_lr_scale``."""
        rates = {"adapter": float(self.lr), "projection": float(self.lr) * float(self.projection_lr_scale)}
        return [Phase("adapter", int(self.steps), {g: rates[g] for g in groups})]


class ImageSource:
    """Items for the recipe: ``get(i) -> (latent [C,h,w], latent-size mask [h,w])`` and
    ``image(i) -> (image [S,S,3], mask [S,S])`` at the training resolution."""

    def __init__(self, latents: torch.Tensor, latent_masks: torch.Tensor, images: torch.Tensor, masks: torch.Tensor):
        if not len(latents) == len(latent_masks) == len(images) == len(masks):
            raise ProductSceneError("source: latents, masks and images must have the same length")
        self.latents, self.latent_masks, self.images, self.masks = latents, latent_masks, images, masks

    def __len__(self):
        return len(self.latents)

    def get(self, i):
        return self.latents[i].float(), self.latent_masks[i].float()

    def image(self, i):
        return self.images[i].float(), self.masks[i].float()


class DatasetSource:
    """A data set with its latent cache: latents from the cache, images read when drawn."""

    def __init__(self, cache: LatentCache, resolution: int):
        self.cache, self.resolution = cache, int(resolution)

    def __len__(self):
        return len(self.cache.dataset)

    def get(self, i):
        return self.cache.get(i)

    def image(self, i):
        return self.cache.dataset.load(i, self.resolution)


def augment(image: torch.Tensor, mask: torch.Tensor, params: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmentation of ``image`` ``[S,S,3]`` and its product ``mask`` ``[S,S]``: ``params`` =
    (crop side fraction, top fraction, left fraction, flip 0/1, brightness, saturation)."""
    side, top, left, flip, brightness, saturation = params
    s = image.shape[0]
    c = max(8, int(round(s * side)))
    y, x = int(round((s - c) * top)), int(round((s - c) * left))
    img = image[y:y + c, x:x + c].permute(2, 0, 1)[None]
    m = mask[y:y + c, x:x + c][None, None]
    img = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    m = F.interpolate(m, size=(s, s), mode="nearest")[0, 0]
    if flip >= 0.5:
        img, m = img.flip(1), m.flip(1)
    grey = img.mean(-1, keepdim=True)
    img = ((grey + (img - grey) * saturation) * brightness).clamp(0.0, 1.0)
    return img, m


class PersonalityRecipe:
    """Recipe for :class:`~productscene.train.engine.Trainer` (group ``adapter``)."""

    def __init__(self, host: DiffusionHost, source, encode_vision: VisionEncoder, adapter: PersonalityAdapter,
                 config: PersonalityConfig | None = None):
        self.host = host
        self.source = source
        self.encode_vision = encode_vision
        self.config = config or PersonalityConfig()
        if adapter.family != host.family:
            raise ProductSceneError(f"adapter: made for {adapter.family}, but the model is {host.family}")
        self.adapter = adapter.to(host.device).train()
        hi = self.config.max_timestep if self.config.max_timestep is not None else host.num_timesteps
        if not 0 <= self.config.min_timestep < hi <= host.num_timesteps:
            raise ProductSceneError(f"timesteps: expected 0 <= min < max <= {host.num_timesteps}, got {self.config.min_timestep}, {hi}")
        self.t_range = (int(self.config.min_timestep), int(hi))
        self._cond: Encoded | None = None

    # -- engine protocol -------------------------------------------------------------------------
    def parameter_groups(self):
        """``adapter``: the per-layer to_k/to_v (and a new adapter's own small projection);
        ``projection``: an IP-Adapter file's image projection (its resampler), already learned, which
        a run nearly keeps (``projection_lr_scale``)."""
        projection = getattr(self.adapter, "projection", None)
        if projection is None:
            return {"adapter": list(self.adapter.parameters())}
        own = {id(p) for p in projection.parameters()}
        return {"adapter": [p for p in self.adapter.parameters() if id(p) not in own],
                "projection": list(projection.parameters())}

    def batch(self, step: int, generator: torch.Generator):
        cfg = self.config
        b = int(cfg.batch_size)
        batch = draw_batch(self.source, b, self.t_range, generator)
        u = distributed.local_rows(torch.rand(distributed.global_rows(b), 6, generator=generator), b)
        params = torch.stack([cfg.crop_scale + (1 - cfg.crop_scale) * u[:, 0], u[:, 1], u[:, 2],
                              (u[:, 3] < cfg.flip).float(), 1 + cfg.jitter * (2 * u[:, 4] - 1),
                              1 + cfg.jitter * (2 * u[:, 5] - 1)], dim=1)
        batch["augment"] = params
        return batch

    def references(self, index: torch.Tensor, params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each item's own background (product filled), augmented when ``params`` are given: the
        references ``[B, S, S, 3]`` and their product masks ``[B, S, S]``."""
        refs, masks = [], []
        for j, i in enumerate(index):
            image, mask = self.source.image(int(i))
            if params is not None:
                image, mask = augment(image, mask, params[j].tolist())
            refs.append(neutral_fill(image[None], mask[None])[0])
            masks.append(mask)
        return torch.stack(refs), torch.stack(masks)

    def tokens_of(self, references: torch.Tensor, reference_masks: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            states = self.encode_vision(references).float()
        patches = reference_masks is not None and states.ndim == 3  # a pooled embedding has no patches
        keep = patch_keep(states.shape[1], reference_masks, states.shape[0]) if patches else None
        return self.adapter.tokens(states.to(self.host.device), keep)

    def loss(self, batch, step):
        refs, ref_masks = self.references(batch["index"], batch["augment"])
        pred, target, weights = self._forward(batch, self.tokens_of(refs, ref_masks))
        return weighted_mse(pred, target, weights), {}

    def describe(self) -> dict:
        return {"recipe": "personality", "family": self.host.family, "config": asdict(self.config)}

    def preview(self, generator: torch.Generator) -> torch.Tensor:
        """The training prompt with the first image's own background (not augmented) as the
        reference, drawn from noise: ``[1, H, W, 3]``."""
        latent, mask = self.source.get(0)
        refs, ref_masks = self.references(torch.tensor([0]), None)
        scene = SceneAttention().with_injection(
            self.adapter.injection(self.tokens_of(refs, ref_masks), mask[None].to(self.host.device)))
        return sample_preview(self.host, self.conditioning(), (1,) + tuple(latent.shape), generator, scene)

    # -- model calls -----------------------------------------------------------------------------
    def conditioning(self) -> Encoded:
        if self._cond is None:
            with torch.no_grad():
                enc = self.host.encode([Prompt(self.config.prompt)])
            self._cond = Encoded(enc.cond.detach(), enc.pooled.detach() if enc.pooled is not None else None,
                                 enc.rows, enc.context_rows)
        return self._cond

    def _forward(self, batch, tokens: torch.Tensor):
        host = self.host
        dev = host.device
        latents, masks, noise = (batch[k].to(dev) for k in ("latents", "masks", "noise"))
        b = latents.shape[0]
        enc = self.conditioning().select(torch.zeros(b, dtype=torch.long))
        sigma = host.sigmas(batch["timesteps"].to(dev))
        x = host.add_noise(latents, noise, sigma)
        scene = SceneAttention().with_injection(self.adapter.injection(tokens, masks.detach().float()))
        pred = host.predict_noise(x, sigma, enc, scene)
        weights = background_weights(masks, latents.shape[-2:], 1.0, self.config.product_weight)
        return pred, noise, weights

    @torch.no_grad()
    def evaluate(self, latents, masks, noise, timesteps, references, reference_masks=None) -> torch.Tensor:
        """Per-sample background-weighted noise-prediction loss ``[B]`` with ``references``
        (``[B, S, S, 3]`` images, not augmented) as each sample's reference."""
        batch = {"latents": latents, "masks": masks, "noise": noise, "timesteps": timesteps}
        pred, target, weights = self._forward(batch, self.tokens_of(references, reference_masks))
        return per_sample_weighted_mse(pred, target.to(pred.device), weights.to(pred.device)).cpu()


# ------------------------------------------------------------------------------------ the run
@dataclass
class PersonalityRun:
    adapter: str | None          # the written adapter; None when the run was cancelled
    result: TrainResult | None
    recipe: PersonalityRecipe | None
    graph: torch.Tensor          # the loss graph as an IMAGE tensor

    @property
    def cancelled(self) -> bool:
        return self.adapter is None


def check_initial(adapter: PersonalityAdapter, family: str, layers: Mapping[tuple, torch.nn.Module],
                  vision_width: int, what: str = "from_ipadapter") -> None:
    """Raise unless ``adapter`` fits the model (family, every layer and width) and the CLIP vision width."""
    if adapter.family != family:
        raise ProductSceneError(f"{what}: the file is for {adapter.family}, but the model is {family}")
    adapter.check_layers({k: m.to_k.weight.shape[0] for k, m in layers.items()}, what)
    if adapter.vision_width != vision_width:
        raise ProductSceneError(f"{what}: the file expects {adapter.vision_width}-wide CLIP vision features, "
                                f"the CLIP vision model gives {vision_width}; use the CLIP vision model it was made for")


def initial_from_ipadapter(path, family: str, layers: Mapping[tuple, torch.nn.Module], vision_width: int,
                           what: str = "from_ipadapter") -> PersonalityAdapter:
    """The IP-Adapter file at ``path`` as the adapter a run fine-tunes (``initial`` of
    :func:`train_personality_adapter`), its pairs mapped onto the model's cross-attention ``layers``
    in IP-Adapter's processor order; raises (naming ``what``) for a file that is no IP-Adapter, one
    for another family or layout, or one for another CLIP vision width. Call it before any work."""
    with training_mode():  # trainable tensors even inside a host's inference mode
        adapter = IPAdapterPersonality.load(path, {k: m.to_k.weight.shape[0] for k, m in layers.items()}, family, what)
    check_initial(adapter, family, layers, vision_width, what)
    return adapter


def train_personality_adapter(host: DiffusionHost, data, out_path, config: PersonalityConfig,
                              options: RunOptions | None = None, *, encode_vision: VisionEncoder, vision_width: int,
                              layers: Mapping[tuple, torch.nn.Module], layout: str = "folder", split: str = "train",
                              checked: DatasetReport | None = None, cache_dir,
                              latent_progress: Callable[[int, int], None] | None = None, license: str | None = None,
                              initial: PersonalityAdapter | None = None, **fields) -> PersonalityRun:
    """The whole personality-adapter run: check outputs and data before any model work (the data
    once; ``checked`` with an opened ``data`` set reuses a report), cache the VAE latents once,
    train the adapter (``layers``: the model's cross-attention modules, keyed as ComfyUI keys attn2
    replaces) and write it to ``out_path`` with its training summary (and ``license``; BG60k's
    own by default on that layout). ``initial``: an adapter to fine-tune (an IP-Adapter file's)
    instead of a new one; it is checked against the model and ``vision_width`` before any model
    work. ``options`` (or their fields as keywords): :class:`..run.RunOptions`."""
    options = RunOptions.of(options, fields)
    if initial is not None:
        check_initial(initial, host.family, layers, int(vision_width))
    ds, _ = checked_inputs(data, out_path, options, layout=layout, split=split, checked=checked)
    with training_mode():
        cache = LatentCache(cache_dir, ds, host.encode_images, int(config.resolution), namespace=host.latent_namespace)
        if not warm_latents(cache, latent_progress, options.should_stop, options.ranks):
            return PersonalityRun(None, None, None, loss_graph([]))
        adapter = initial if initial is not None else PersonalityAdapter.for_layers(
            host.family, int(vision_width), layers, tokens=int(config.tokens), seed=options.seed)
        recipe = PersonalityRecipe(host, DatasetSource(cache, config.resolution), encode_vision, adapter, config)
        trained = run_recipe(host, recipe, config.phases(list(recipe.parameter_groups())), options, name="personality",
                             latent_shape=(int(config.batch_size),) + tuple(cache.get(0)[0].shape))
    if trained.cancelled:
        return PersonalityRun(None, trained.result, recipe, trained.graph)
    license = license_of(license, layout)
    summary = trained.summary("personality", options.seed, asdict(config), images=len(ds), layout=layout,
                              resolution=int(config.resolution))
    if license is not None:
        summary["license"] = license
    path = adapter.save(out_path, training=summary) if options.ranks.is_main else os.fspath(out_path)
    return PersonalityRun(path, trained.result, recipe, trained.graph)
