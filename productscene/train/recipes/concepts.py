"""Break-A-Scene (SPEC section 3): several concepts from one image, as a recipe on the one engine.

Each concept (a mask of the image, optionally the background = the complement of their union)
gets a new token ``<name>``. Every step draws k ~ U{1..N} concepts (union sampling) and trains on
"a photo of <a> and <b>":

* masked diffusion loss: the noise MSE with prediction and target multiplied by the union of the
  drawn masks at latent size (mean over every element, as published);
* cross-attention loss: each drawn token's attention map on the lowest-resolution cross-attention
  layers of the UNet (16x16 for SD1.5/SD2.x at 512 px; SDXL has no 16x16 layer at 1024 px and uses
  its lowest ones, 32x32), averaged over those layers and heads, divided by its max, against its mask
  at that size: MSE summed over the drawn tokens, times ``attention_weight`` (0.01). Only those
  layers' token columns are captured (``AttentionCapture``), never full probabilities.

Phase 1 trains only the new token vectors (lr 5e-4); phase 2 the vectors plus a LoRA (default) or
the full UNet. Phase 2's learning rate follows what it trains unless given (:data:`LR_PHASE2`): the
published 2e-6 for the full UNet, 1e-4 for the LoRA (whose up weights start at zero, so 2e-6 barely
moves it). The other defaults hold for both modes (checked for issue 30): AdamW's weight decay
1e-2 on the UNet side (at 1e-4 it takes 1e-6 of a weight per step), gradient clipping at 1.0, rank 4
with alpha = rank, attention weight 0.01 (at the start its gradient on the tokens is already 2.7x the
masked loss's on the world base), phase 1's 5e-4 (tokens only, the same in both modes).
Horizontal flip with p = 0.5 (image latent encoded once flipped and once not, never a VAE pass per
step), batch size >= 1, optional prior preservation on class images.

Several ranks (``torchrun``, :mod:`..distributed`): ``batch_size`` is per rank; every rank draws the
whole global batch (concept subsets, flips, noise, timesteps) from the same seeded generator and
keeps its own rows, so the draws are those of one process with the total batch. Both losses are
means over the rank's rows and every rank has as many rows, so the mean of the ranks' losses (and
gradients, which the engine averages) is the one-process loss over the global batch. The prior
sample is one per step, drawn alike on every rank (the same term on each, so its mean is itself).
Only rank 0 writes the token library, the LoRA, the textual-inversion files and the loss history.

The result is a token library (the category-library format, names = the concept placeholders, so
Category Tokens and Concept Tokens read it alike), the LoRA as a ComfyUI LoRA file (full-UNet
training: a ``.diff`` file LoraLoader applies), one textual-inversion file per token and the loss
history. :func:`train_concepts` is the whole run shared by the node and the command line.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ...attention import AttentionCapture, SceneAttention
from ...errors import ProductSceneError
from ...files import save_safetensors_atomic, write_bytes_atomic
from ...library import TokenLibrary
from ...prompt import Prompt, init_vectors
from .. import distributed
from ..engine import Phase, TrainResult, training_mode
from ..lora import DEFAULT_TARGETS, LoRA
from ..losses import attention_loss, masked_diffusion_loss
from ..sampling import draw_concepts, union_mask, union_prompt
from ..run import RunOptions, check_outputs, run_recipe
from . import DiffusionHost, sample_preview

MAX_CONCEPTS = 8
BACKGROUND = "<background>"
DEFAULT_INIT_WORD = "object"
NAME_PATTERN = re.compile(r"^<[A-Za-z0-9_\-]+>$")
TI_FORMAT = "textual_inversion"
LORA_FORMAT = "lora"
# phase 2's learning rate by what it trains (ConceptConfig.lr_phase2 = None): the published rate for
# the full UNet; for the LoRA the rate measured best on the world base (tests/test_concept_learning.py)
LR_PHASE2 = {"full": 2e-6, "lora": 1e-4}


@dataclass
class ConceptConfig:
    names: tuple = ()                  # placeholders, one per mask ("<bottle>"); default <concept1>..
    init_words: tuple = ()             # one per concept ("" or missing: DEFAULT_INIT_WORD)
    background: bool = False           # one more concept: the complement of the masks' union
    background_init_word: str = "background"
    template: str = "a photo of {}"    # "{}" is replaced by "<a> and <b> ..."
    vectors_per_token: int = 1
    resolution: int = 512              # longer side after resizing (0 = keep); sides multiples of 64
    phase1_steps: int = 400
    phase2_steps: int = 400
    lr_phase1: float = 5e-4
    lr_phase2: float | None = None     # None: follows ``unet`` (LR_PHASE2)
    unet: str = "lora"                 # phase 2 trains a "lora" or the "full" UNet
    rank: int = 4
    alpha: float | None = None
    targets: tuple = DEFAULT_TARGETS
    attention_weight: float = 0.01
    flip_p: float = 0.5
    batch_size: int = 1
    prior_weight: float = 0.0          # > 0 with class images: prior preservation
    class_prompt: str = "a photo of an object"
    min_timestep: int = 0
    max_timestep: int | None = None

    def __post_init__(self):
        self.names = tuple(self.names)
        self.init_words = tuple(self.init_words)
        self.targets = tuple(self.targets)
        if "{}" not in self.template or self.template.count("{}") != 1:
            raise ProductSceneError(f"template: must contain {{}} exactly once (where the concept tokens go), got {self.template!r}")
        r = int(self.resolution)
        if r < 0 or (r and r % 64):
            raise ProductSceneError(f"resolution: expected 0 (keep the image size) or a multiple of 64, got {self.resolution}")
        for name in ("vectors_per_token", "rank", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ProductSceneError(f"{name}: expected 1 or more, got {getattr(self, name)}")
        if int(self.phase1_steps) < 0 or int(self.phase2_steps) < 0 or int(self.phase1_steps) + int(self.phase2_steps) < 1:
            raise ProductSceneError(
                f"steps: expected phase 1 and phase 2 steps >= 0 with at least one step, got {self.phase1_steps}, {self.phase2_steps}")
        if self.unet not in ("lora", "full"):
            raise ProductSceneError(f"unet: expected 'lora' or 'full', got {self.unet!r}")
        if self.lr_phase2 is None:
            self.lr_phase2 = LR_PHASE2[self.unet]
        for name in ("lr_phase1", "lr_phase2"):
            if not float(getattr(self, name)) > 0:
                raise ProductSceneError(f"{name}: expected a learning rate > 0, got {getattr(self, name)}")
        if not 0.0 <= float(self.flip_p) <= 1.0:
            raise ProductSceneError(f"flip_p: expected a probability from 0 to 1, got {self.flip_p}")
        if float(self.attention_weight) < 0 or float(self.prior_weight) < 0:
            raise ProductSceneError("attention_weight/prior_weight: expected 0 or more")

    def phases(self) -> list[Phase]:
        second = "unet" if self.unet == "full" else "lora"
        out = []
        if int(self.phase1_steps):
            out.append(Phase("tokens", int(self.phase1_steps), {"tokens": float(self.lr_phase1)},
                             weight_decay={"tokens": 0.0}))
        if int(self.phase2_steps):
            out.append(Phase(f"tokens+{second}", int(self.phase2_steps),
                             {"tokens": float(self.lr_phase2), second: float(self.lr_phase2)},
                             weight_decay={"tokens": 0.0}))
        return out


def concept_names(count: int, names: Sequence[str] = (), background: bool = False) -> list[str]:
    """The placeholders: given ones (``bottle`` becomes ``<bottle>``) or ``<concept1>``..; the
    background's is ``<background>``. Names must be unique and look like ``<word>``."""
    given = [str(n).strip() for n in names if str(n).strip()]
    if given and len(given) != count:
        raise ProductSceneError(f"names: {len(given)} concept names for {count} masks; give one name per mask (or none)")
    out = []
    for i in range(count):
        n = given[i] if given else f"<concept{i + 1}>"
        if not n.startswith("<"):
            n = f"<{n}>"
        if not NAME_PATTERN.match(n):
            raise ProductSceneError(
                f"names: {n!r} is not a usable concept name; use letters, digits, '-' or '_' inside <...>, e.g. <bottle>")
        out.append(n)
    if background:
        out.append(BACKGROUND)
    dups = sorted({n for n in out if out.count(n) > 1})
    if dups:
        raise ProductSceneError(f"names: concept names must be unique, {dups} appear twice")
    return out


def scene_size(image_hw: Sequence[int], resolution: int) -> tuple[int, int]:
    """(H, W) the image is trained at: the longer side scaled to ``resolution`` (0: kept); both
    sides must then be multiples of 64."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if resolution:
        s = float(resolution) / max(h, w)
        h, w = int(round(h * s)), int(round(w * s))
    if h < 64 or w < 64 or h % 64 or w % 64:
        raise ProductSceneError(
            f"image: {image_hw[1]}x{image_hw[0]} becomes {w}x{h} at resolution {resolution}; both sides must be "
            f"multiples of 64 (crop the image, or choose a resolution that gives multiples of 64)")
    return h, w


def prepare_scene(image: torch.Tensor, masks: torch.Tensor, resolution: int, background: bool = False,
                  latent_factor: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and resize one image ``[1,H,W,C]`` and its concept masks ``[N,h,w]`` (any size, may
    overlap). Returns ``(image [1,H',W',3], masks [N,H',W'] in 0..1)``; with ``background`` the
    complement of the union is appended. Every problem raises before any model work."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] < 3:
        raise ProductSceneError(f"image: expected one IMAGE [1, H, W, 3], got {list(getattr(image, 'shape', []))}")
    if image.shape[0] != 1:
        raise ProductSceneError(f"image: Break-A-Scene learns from ONE image, got a batch of {image.shape[0]}")
    if not isinstance(masks, torch.Tensor) or masks.dim() not in (2, 3):
        raise ProductSceneError(f"masks: expected a MASK batch [N, H, W], got {list(getattr(masks, 'shape', []))}")
    masks = masks[None] if masks.dim() == 2 else masks
    n = int(masks.shape[0])
    if n < 1:
        raise ProductSceneError("masks: expected at least one concept mask")
    if n > MAX_CONCEPTS:
        raise ProductSceneError(f"masks: {n} masks given, at most {MAX_CONCEPTS} concepts are supported (plus the background)")
    if not torch.isfinite(masks).all():
        raise ProductSceneError("masks: contain NaN or infinite values")
    for i in range(n):
        if float(masks[i].max()) <= 0.0:
            raise ProductSceneError(f"masks: mask {i + 1} of {n} is empty (no pixel above 0); draw the concept's region")
    h, w = scene_size(image.shape[1:3], resolution)
    img = image[..., :3].float()
    if tuple(img.shape[1:3]) != (h, w):
        img = F.interpolate(img.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", antialias=True,
                            align_corners=False).permute(0, 2, 3, 1).clamp(0, 1)
    m = F.interpolate(masks.float().clamp(0, 1)[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    m = (m > 0.5).float()
    lh, lw = h // latent_factor, w // latent_factor
    cells = F.adaptive_avg_pool2d(m[:, None], (lh, lw))[:, 0]
    for i in range(n):
        if float(cells[i].max()) < 0.5:
            raise ProductSceneError(
                f"masks: mask {i + 1} covers nothing of the {w}x{h} image (not even half of one {latent_factor}x"
                f"{latent_factor} latent cell once resized); make the region larger")
    if background:
        rest = 1.0 - m.amax(0, keepdim=True)
        if float(F.adaptive_avg_pool2d(rest[:, None], (lh, lw)).max()) < 0.5:
            raise ProductSceneError("background: the masks cover the whole image, so there is no background to learn; "
                                    "turn the background concept off")
        m = torch.cat([m, rest])
    return img, m


@dataclass
class ConceptData:
    latents: torch.Tensor          # [2, C, h, w]: the image and its mirror
    masks: torch.Tensor            # [2, N, h, w] concept masks at latent size (area), mirror second
    prior_latents: torch.Tensor | None = None   # [P, C, h, w] class images


class ConceptRecipe:
    """The Break-A-Scene recipe (see the module docstring)."""

    def __init__(self, host: DiffusionHost, data: ConceptData, names: Sequence[str], config: ConceptConfig,
                 init_words: Sequence[str], seed: int = 0, initial: Mapping[str, torch.Tensor] | None = None):
        self.host = host
        self.config = config
        self.names = list(names)
        self.data = data
        self.init_words = list(init_words)
        self.encoders = dict(host.encoders)
        self.downsample = int(host.attention_downsample)
        device = host.device
        n = int(config.vectors_per_token)
        if initial is None:
            rows = {e: [] for e in self.encoders}
            for word in self.init_words:
                emb = host.token_embeddings(word)
                for e in self.encoders:
                    rows[e].append(init_vectors(emb[e].detach().cpu(), n))
            initial = {e: torch.stack(r) for e, r in rows.items()}
        self.vectors = {e: torch.nn.Parameter(initial[e].detach().float().clone().to(device)) for e in self.encoders}
        self.lora = None
        self.unet_params: list[torch.Tensor] = []
        self._unet_start: dict[str, torch.Tensor] = {}
        if config.unet == "lora":
            self.lora = LoRA(host.unet, rank=config.rank, alpha=config.alpha, targets=config.targets,
                             prefix=host.lora_prefix, seed=seed + 7919, device=device)
        hi = config.max_timestep if config.max_timestep is not None else host.num_timesteps
        if not 0 <= config.min_timestep < hi <= host.num_timesteps:
            raise ProductSceneError(f"timesteps: expected 0 <= min < max <= {host.num_timesteps}, got {config.min_timestep}, {hi}")
        self.t_range = (int(config.min_timestep), int(hi))

    def bind_unet(self) -> None:
        """Full-UNet training: take the UNet's (session) weights as trainables and remember their
        starting values for the ``.diff`` export. Call inside the host session."""
        if self.config.unet != "full":
            return
        self.unet_params = [p for p in self.host.unet.parameters() if p.is_floating_point()]
        self._unet_start = {k: v.detach().to("cpu", copy=True) for k, v in self.host.unet.state_dict().items()
                            if v.is_floating_point()}

    @contextlib.contextmanager
    def unet_bound(self):
        """Inside the host session: :meth:`bind_unet` on entry, :meth:`restore_unet` on exit."""
        self.bind_unet()
        try:
            yield
        finally:
            self.restore_unet()

    def restore_unet(self) -> None:
        """Full-UNet training changed the (shared) model in place: put its starting weights back
        (the change lives on in the ``.diff`` file and the checkpoint)."""
        if not self._unet_start:
            return
        with torch.no_grad():
            for k, v in self.host.unet.state_dict().items():
                if k in self._unet_start:
                    v.copy_(self._unet_start[k].to(v.device, v.dtype))

    # -- engine protocol -------------------------------------------------------------------------
    def parameter_groups(self):
        groups = {"tokens": [self.vectors[e] for e in self.encoders]}
        if self.lora is not None:
            groups["lora"] = list(self.lora.parameters())
        else:
            if not self.unet_params:
                raise ProductSceneError("unet: full-UNet training needs bind_unet() inside the host session")
            groups["unet"] = self.unet_params
        return groups

    def batch(self, step: int, generator: torch.Generator):
        b = int(self.config.batch_size)
        n = distributed.global_rows(b)  # several ranks: the global batch is drawn, this rank's rows kept
        drawn = distributed.local_rows([draw_concepts(len(self.names), generator) for _ in range(n)], b)
        flips = (torch.rand(n, generator=generator) < float(self.config.flip_p)).long()
        noise = torch.randn((n,) + tuple(self.data.latents.shape[1:]), generator=generator)
        t = torch.randint(self.t_range[0], self.t_range[1], (n,), generator=generator)
        out = {"drawn": drawn, "flips": distributed.local_rows(flips, b), "noise": distributed.local_rows(noise, b),
               "timesteps": distributed.local_rows(t, b)}
        if self.data.prior_latents is not None and self.config.prior_weight > 0:
            pi = torch.randint(len(self.data.prior_latents), (1,), generator=generator)
            out["prior"] = (pi, torch.randn((1,) + tuple(self.data.prior_latents.shape[1:]), generator=generator),
                            torch.randint(self.t_range[0], self.t_range[1], (1,), generator=generator))
        return out

    def prompt(self, drawn: Sequence[int]) -> Prompt:
        tokens = [self.names[i] for i in drawn]
        return Prompt(union_prompt(tokens, self.config.template),
                      {name: {e: self.vectors[e][i] for e in self.encoders} for i, name in zip(drawn, tokens)})

    def preview(self, generator: torch.Generator) -> torch.Tensor:
        """Every concept in one prompt (``a photo of <a> and <b>``), drawn from noise: ``[1,H,W,3]``."""
        enc = self.host.encode([self.prompt(list(range(len(self.names))))])
        return sample_preview(self.host, enc, (1,) + tuple(self.data.latents.shape[1:]), generator)

    def forward(self, batch):
        """Noise prediction with the drawn tokens' attention captured. Returns
        ``(pred, noise, union [B,h,w], capture, drawn)``."""
        host, dev = self.host, self.host.device
        flips = batch["flips"]
        latents = self.data.latents[flips].to(dev)
        masks = self.data.masks[flips].to(dev)                        # [B, N, h, w]
        drawn = batch["drawn"]
        union = torch.stack([union_mask(masks[i], d)[0] for i, d in enumerate(drawn)])
        enc = host.encode([self.prompt(d) for d in drawn])
        rows = {name: [list(r.get(name, ())) for r in enc.rows] for name in self.names}
        capture = AttentionCapture(rows, downsample=self.downsample)
        sigma = host.sigmas(batch["timesteps"].to(dev))
        noise = batch["noise"].to(dev)
        x = host.add_noise(latents, noise, sigma)
        pred = host.predict_noise(x, sigma, enc, SceneAttention(capture=capture))
        return pred, noise, union, masks, capture

    def loss(self, batch, step):
        pred, noise, union, masks, capture = self.forward(batch)
        diffusion = masked_diffusion_loss(pred, noise, union, normalize="all")
        maps = capture.maps()
        attn = pred.new_zeros((), dtype=torch.float32)
        for i, drawn in enumerate(batch["drawn"]):
            names = [self.names[j] for j in drawn]
            attn = attn + attention_loss({n: maps[n][i:i + 1] for n in names},
                                         {n: masks[i:i + 1, j] for n, j in zip(names, drawn)},
                                         weight=float(self.config.attention_weight))
        attn = attn / len(batch["drawn"])
        capture.clear()
        loss = diffusion + attn
        logs = {"masked_loss": float(diffusion.detach()), "attention_loss": float(attn.detach())}
        if "prior" in batch:
            pi, pnoise, pt = batch["prior"]
            dev = self.host.device
            plat = self.data.prior_latents[pi].to(dev)
            psigma = self.host.sigmas(pt.to(dev))
            penc = self.host.encode([Prompt(self.config.class_prompt)])
            ppred = self.host.predict_noise(self.host.add_noise(plat, pnoise.to(dev), psigma), psigma, penc, None)
            prior = F.mse_loss(ppred.float(), pnoise.to(dev).float())
            loss = loss + float(self.config.prior_weight) * prior
            logs["prior_loss"] = float(prior.detach())
        return loss, logs

    @torch.no_grad()
    def attention_maps(self, drawn: Sequence[int] | None = None, timestep: int = 500, seed: int = 0,
                       flip: bool = False) -> dict[str, torch.Tensor]:
        """Each token's attention map ``[h, w]`` (lowest-resolution layers) for the prompt of
        ``drawn`` (default: every concept) at one noise level (evaluation)."""
        drawn = tuple(range(len(self.names))) if drawn is None else tuple(drawn)
        g = torch.Generator().manual_seed(seed)
        batch = {"drawn": [drawn], "flips": torch.tensor([int(flip)]),
                 "noise": torch.randn((1,) + tuple(self.data.latents.shape[1:]), generator=g),
                 "timesteps": torch.tensor([int(timestep)])}
        *_, capture = self.forward(batch)
        maps = capture.maps()
        return {self.names[i]: maps[self.names[i]][0].float().cpu() for i in drawn}

    def extra_state(self):
        return {}

    def describe(self) -> dict:
        cfg = asdict(self.config)
        cfg["targets"] = list(cfg["targets"])
        return {"recipe": "concepts", "family": self.host.family, "concepts": self.names, "config": cfg}

    # -- output ----------------------------------------------------------------------------------
    def token_vectors(self) -> dict[str, torch.Tensor]:
        return {e: v.detach().float().cpu() for e, v in self.vectors.items()}

    def unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet change in ComfyUI LoRA key format: low-rank ``lora_up/down`` (LoRA) or
        ``.diff`` per changed weight (full UNet)."""
        if self.lora is not None:
            return self.lora.comfy_state_dict()
        out = {}
        for k, v in self.host.unet.state_dict().items():
            start = self._unet_start.get(k)
            if start is not None:
                d = v.detach().cpu().float() - start.float()
                if torch.count_nonzero(d):  # ComfyUI's generic key: the weight's path without ".weight"
                    base = k[:-len(".weight")] if k.endswith(".weight") else k
                    out[f"{self.host.lora_prefix}{base}.diff"] = d.to(torch.float16).contiguous()
        return out


# ------------------------------------------------------------------------------------ files
def write_textual_inversion(path, vectors: Mapping[str, torch.Tensor], family: str, token: str) -> str:
    """One token as a standard textual-inversion file (safetensors): SD1.5/SD2.x: a single tensor
    ``[n, width]`` named after the token (diffusers' ``load_textual_inversion``, A1111 and
    ComfyUI's ``embedding:`` all read it); SDXL: ``clip_l`` and ``clip_g`` (A1111/ComfyUI)."""
    if family == "sdxl":
        tensors = {e: vectors[e].detach().float().cpu().contiguous() for e in ("clip_l", "clip_g")}
    else:
        (enc,) = list(vectors)
        tensors = {token: vectors[enc].detach().float().cpu().contiguous()}
    save_safetensors_atomic(tensors, path, {"token": json.dumps(token), "base_family": json.dumps(family)},
                            kind=TI_FORMAT, version=1)
    return os.fspath(path)


def ti_file_stem(stem: str, token: str) -> str:
    return f"{stem}_{token.strip('<>')}"


@dataclass
class ConceptRun:
    tokens: str | None                   # the token library; None when cancelled
    lora: str | None
    embeddings: dict = field(default_factory=dict)   # token -> textual-inversion file
    history_file: str | None = None
    result: TrainResult | None = None
    recipe: ConceptRecipe | None = None
    graph: torch.Tensor | None = None

    @property
    def cancelled(self) -> bool:
        return self.tokens is None


def _default_words(init_words: Sequence[str], count: int) -> list[str]:
    words = [str(w).strip() for w in init_words]
    if words and len(words) not in (1, count):
        raise ProductSceneError(f"init_words: {len(words)} words for {count} masks; give one per mask, one for all, or none")
    if len(words) == 1:
        words = words * count
    return [w or DEFAULT_INIT_WORD for w in words] if words else [DEFAULT_INIT_WORD] * count


def check_init_words(host: DiffusionHost, words: Sequence[str], names: Sequence[str]) -> None:
    for word, name in zip(words, names):
        try:
            host.token_embeddings(word)
        except ProductSceneError:
            raise ProductSceneError(
                f"init_words: {word!r} (for {name}) tokenizes to nothing; give a word, e.g. 'bottle'") from None


def check_concept_outputs(out_path, names: Sequence[str], *, lora_path=None, embeddings_dir=None,
                          checkpoint_path=None, resume: bool | str = False, overwrite: bool = False, out: str = "out",
                          shown: Callable[[str], str] = os.path.basename,
                          hint: str = "pass overwrite, choose another name, or resume its training") -> dict[str, str]:
    """Before any work: every file a run for the concepts ``names`` writes (the token library, the
    LoRA, one textual-inversion file per token, the training state) can be written and replaces
    nothing unless ``overwrite`` (or a resume of that run). Returns ``{name: textual-inversion path}``."""
    stem = os.path.splitext(os.path.basename(os.fspath(out_path)))[0]
    ti_paths = {name: os.path.join(embeddings_dir, ti_file_stem(stem, name) + ".safetensors")
                for name in names} if embeddings_dir is not None else {}
    others = [p for p in (lora_path, *ti_paths.values()) if p is not None]
    check_outputs(out_path, checkpoint_path, resume=resume, overwrite=overwrite, out=out, hint=hint,
                  shown_out=shown(os.fspath(out_path)),
                  shown_state=shown(os.fspath(checkpoint_path)) if checkpoint_path is not None else None,
                  also=[(p, shown(os.fspath(p))) for p in others])
    return ti_paths


def train_concepts(host: DiffusionHost, image: torch.Tensor, masks: torch.Tensor, out_path, config: ConceptConfig,
                   options: RunOptions | None = None, *, lora_path=None, embeddings_dir=None, history_path=None,
                   class_images: torch.Tensor | None = None, **fields) -> ConceptRun:
    """The whole Break-A-Scene run: check everything (before any model work), encode the image
    (and its mirror, and the class images) once, train both phases, write the token library
    (``out_path``), the LoRA (``lora_path``), one textual-inversion file per token (in
    ``embeddings_dir``) and the loss history (``history_path``, JSON). ``options`` (or their fields
    as keywords): :class:`..run.RunOptions`. A stop request saves the checkpoint and returns a run
    with ``tokens=None``. The token library, the LoRA, the textual-inversion files and the training
    state are never replaced unless ``overwrite`` (or a resume of that run); hosts check first with
    :func:`check_concept_outputs` in their own words."""
    options = RunOptions.of(options, fields)
    img, full_masks = prepare_scene(image, masks, int(config.resolution), config.background)
    count = len(full_masks) - int(bool(config.background))
    names = concept_names(count, config.names, config.background)
    ti_paths = check_concept_outputs(out_path, names, lora_path=lora_path, embeddings_dir=embeddings_dir,
                                     checkpoint_path=options.checkpoint_path, resume=options.resume,
                                     overwrite=options.overwrite)
    words = _default_words(config.init_words, count) + ([config.background_init_word] if config.background else [])
    check_init_words(host, words, names)
    if class_images is not None and config.prior_weight > 0 and (class_images.dim() != 4 or class_images.shape[0] < 1):
        raise ProductSceneError("class_images: expected an IMAGE batch of class images for prior preservation")
    with training_mode():
        both = torch.cat([img, img.flip(2)])
        latents = host.encode_images(both).float()
        lh, lw = latents.shape[-2:]
        m = F.adaptive_avg_pool2d(full_masks[:, None], (lh, lw))[:, 0]
        data = ConceptData(latents, torch.stack([m, m.flip(-1)]))
        if class_images is not None and config.prior_weight > 0:
            ci = F.interpolate(class_images[..., :3].float().permute(0, 3, 1, 2), size=tuple(img.shape[1:3]),
                               mode="bilinear", antialias=True, align_corners=False).permute(0, 2, 3, 1).clamp(0, 1)
            data.prior_latents = host.encode_images(ci).float()
        recipe = ConceptRecipe(host, data, names, config, words, seed=options.seed)
        trained = run_recipe(host, recipe, config.phases(), options, name="concepts", lora=recipe.lora,
                             latent_shape=(int(config.batch_size),) + tuple(latents.shape[1:]),
                             bound=recipe.unet_bound, keep=recipe.unet_state_dict)
    if trained.cancelled:
        return ConceptRun(None, None, result=trained.result, recipe=recipe, graph=trained.graph)
    unet_sd = trained.kept
    summary = trained.summary("concepts", options.seed, recipe.describe()["config"], concepts=names,
                              image_size=list(img.shape[1:3]))
    vectors = recipe.token_vectors()
    if not options.ranks.is_main:  # the other ranks hold the same tokens and LoRA; rank 0 writes
        return ConceptRun(os.fspath(out_path), os.fspath(lora_path) if lora_path is not None and unet_sd else None,
                          dict(ti_paths), os.fspath(history_path) if history_path is not None else None,
                          trained.result, recipe, trained.graph)
    lora_file = None
    if lora_path is not None and unet_sd:
        save_safetensors_atomic(unet_sd, lora_path, {"concepts": json.dumps(names), "base_family": json.dumps(host.family),
                                                     "kind": json.dumps(config.unet)}, kind=LORA_FORMAT, version=1)
        lora_file = os.fspath(lora_path)
    path = TokenLibrary.write(out_path, names, vectors, host.family, init_words=dict(zip(names, words)),
                                 lora=unet_sd if config.unet == "lora" else None, training=summary)
    embeddings = {}
    if embeddings_dir is not None:
        os.makedirs(embeddings_dir, exist_ok=True)
        for i, name in enumerate(names):
            embeddings[name] = write_textual_inversion(ti_paths[name], {e: v[i] for e, v in vectors.items()},
                                                       host.family, name)
    history_file = None
    if history_path is not None:
        write_bytes_atomic(history_path, json.dumps({"loss": trained.result.history,
                                                     "logs": trained.result.logs}).encode())
        history_file = os.fspath(history_path)
    return ConceptRun(path, lora_file, embeddings, history_file, trained.result, recipe, trained.graph)


__all__ = ["ConceptConfig", "LR_PHASE2", "ConceptRecipe", "ConceptRun", "MAX_CONCEPTS", "prepare_scene", "train_concepts",
           "check_concept_outputs",
           "write_textual_inversion", "concept_names"]
