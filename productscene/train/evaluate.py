"""Scoring a category library on held-out images (host-free): ``python -m productscene
evaluate-library``.

Every image's denoising loss is measured under EVERY identifier of the library, with the same noise
and timesteps for every identifier (``draws`` noise draws per image), through the category recipe's
own forward pass (the library's shared LoRA loaded, the gate on, the loss weighted to the
background as the library was trained). From the ``[images, identifiers]`` table:

* the confusion matrix: rows = true category, columns = identifier used, each cell the mean loss
  of that category's images under that identifier (and the same relative to the row's mean);
* top-1: an image is right when its own category's identifier gives its lowest loss; the
  ``picks`` matrix counts, per true category, which identifier won;
* each category's margin: (best other identifier's loss - own loss) / own loss on its images.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ProductSceneError
from ..library import TokenLibrary
from .datasets import Dataset, LatentCache, check
from .engine import training_mode
from .lora import CROSS_ATTENTION_TARGETS, DEFAULT_TARGETS
from .recipes import DiffusionHost
from .recipes.categories import CachedSource, CategoryConfig, CategoryRecipe


@dataclass
class LibraryScore:
    categories: list[str]          # true categories (rows), those of the data set
    identifiers: list[str]         # identifiers used (columns): every category of the library
    loss: torch.Tensor             # [rows, columns] mean loss
    picks: torch.Tensor            # [rows, columns] images whose lowest loss came from that identifier
    per_image: torch.Tensor        # [images, columns] loss of every image (mean over the draws)
    truth: list[int]               # column of each image's own category
    draws: int
    timesteps: tuple[int, int]
    seed: int

    @property
    def top1(self) -> float:
        best = self.per_image.argmin(1)
        return float((best == torch.tensor(self.truth)).float().mean())

    def margins(self) -> dict[str, dict[str, float]]:
        out = {}
        for r, cat in enumerate(self.categories):
            k = self.identifiers.index(cat)
            own = float(self.loss[r, k])
            others = [float(self.loss[r, j]) for j in range(len(self.identifiers)) if j != k]
            best = min(others) if others else float("nan")
            out[cat] = {"own": own, "best_other": best, "margin": best - own,
                        "relative": (best - own) / own if own > 0 else float("nan")}
        return out

    def relative(self) -> torch.Tensor:
        """The loss matrix divided by each row's mean (1.0 = no identifier matters)."""
        return self.loss / self.loss.mean(1, keepdim=True)

    def to_json(self) -> dict:
        return {"categories": self.categories, "identifiers": self.identifiers,
                "loss": self.loss.tolist(), "relative": self.relative().tolist(), "picks": self.picks.tolist(),
                "top1_accuracy": self.top1, "margins": self.margins(), "images": len(self.truth),
                "draws": self.draws, "timesteps": list(self.timesteps), "seed": self.seed}

    def format(self, limit: int = 30) -> str:
        """The confusion matrix (relative loss, %; the lowest of each row marked ``*``), the top-1
        picks, top-1 accuracy and every category's margin, as text."""
        cols = self.identifiers[:limit]
        w = max(8, max(len(c) for c in self.categories + cols) + 1)
        rel = self.relative()
        lines = [f"held-out loss relative to the row mean, % (rows: true category, columns: identifier used; "
                 f"{len(self.truth)} images x {self.draws} noise draws, timesteps {self.timesteps[0]}..{self.timesteps[1] - 1})"]
        lines.append(" " * w + "".join(f"{c:>{w}}" for c in cols))
        for r, cat in enumerate(self.categories):
            best = int(self.loss[r].argmin())
            cells = "".join(f"{100 * float(rel[r, k]):>{w - 1}.1f}" + ("*" if k == best else " ")
                            for k in range(len(cols)))
            lines.append(f"{cat:>{w}}" + cells)
        lines.append("top-1 picks (images whose lowest loss came from each identifier):")
        lines.append(" " * w + "".join(f"{c:>{w}}" for c in cols))
        for r, cat in enumerate(self.categories):
            lines.append(f"{cat:>{w}}" + "".join(f"{int(self.picks[r, k]):>{w}}" for k in range(len(cols))))
        if len(self.identifiers) > limit:
            lines.append(f"({len(self.identifiers) - limit} more identifiers not shown; use --json for all)")
        lines.append(f"top-1 accuracy: {100 * self.top1:.1f}% ({len(self.truth)} images)")
        lines.append("margin per category ((best other identifier - own) / own):")
        for cat, m in self.margins().items():
            lines.append(f"  {cat:>{w}}: own {m['own']:.5f}, best other {m['best_other']:.5f}, "
                         f"margin {100 * m['relative']:+.2f}%")
        return "\n".join(lines)


def library_config(library: TokenLibrary) -> tuple[CategoryConfig, list]:
    """The configuration the library was trained with (its ``training.config``), else defaults;
    and the LoRA target patterns to try, in order."""
    cfg = dict(((library.training or {}).get("config") or {}))
    known = {f.name for f in dataclasses.fields(CategoryConfig)}
    cfg = {k: v for k, v in cfg.items() if k in known}
    cfg["vectors_per_token"] = library.vectors_per_token
    cfg["monitor_attention"] = False
    if "targets" in cfg:
        cfg["targets"] = tuple(cfg["targets"])
        targets = [cfg["targets"]]
    else:
        targets = [DEFAULT_TARGETS, CROSS_ATTENTION_TARGETS]
    lora = library.lora_state_dict()
    if lora:
        ranks = {int(v.shape[1]) for k, v in lora.items() if k.endswith(".lora_up.weight")}
        if len(ranks) == 1:
            cfg["rank"] = ranks.pop()
    return CategoryConfig(**cfg), targets


def evaluate_library(host: DiffusionHost, dataset: Dataset, library_path, *, cache_dir, draws: int = 4,
                     seed: int = 0, batch_size: int = 8, min_timestep: int | None = None,
                     max_timestep: int | None = None, resolution: int | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     latent_progress: Callable[[int, int], None] | None = None) -> LibraryScore:
    """Score ``library_path`` on ``dataset`` (see the module docstring). Every data problem and
    every category of the data missing from the library raise before any model work."""
    library = TokenLibrary.open(library_path)
    if library.family != host.family:
        raise ProductSceneError(f"library: {os.path.basename(library.path)} is for {library.family}, "
                                f"but the checkpoint is {host.family}")
    if int(draws) < 1 or int(batch_size) < 1:
        raise ProductSceneError(f"draws/batch size: expected 1 or more, got {draws} / {batch_size}")
    report = check(dataset, categories=library.names)
    report.raise_if_problems()
    config, target_options = library_config(library)
    if resolution is not None:
        config.resolution = int(resolution)
    lo = int(config.min_timestep if min_timestep is None else min_timestep)
    hi = int(config.max_timestep if max_timestep is None and config.max_timestep is not None
             else (max_timestep if max_timestep is not None else host.num_timesteps))
    if not 0 <= lo < hi <= host.num_timesteps:
        raise ProductSceneError(f"timesteps: expected 0 <= min < max <= {host.num_timesteps}, got {lo}, {hi}")
    with training_mode():
        cache = LatentCache(cache_dir, dataset, host.encode_images, int(config.resolution),
                            namespace=host.latent_namespace)
        cache.warm(progress=latent_progress)
        vectors = library.all_vectors()
        lora = library.lora_state_dict()
        recipe = None
        for targets in target_options:
            config.targets = targets
            candidate = CategoryRecipe(host, CachedSource(cache), library.names, config, seed=seed, initial=vectors)
            if not lora:
                recipe = candidate
                break
            try:
                candidate.lora.load_comfy_state_dict(lora)
                recipe = candidate
                break
            except ProductSceneError as e:
                error = e
        if recipe is None:
            raise ProductSceneError(f"library: its LoRA does not fit this checkpoint's UNet ({error})")
        n = len(dataset)
        items = [cache.get(i) for i in range(n)]
        latents = torch.stack([l for l, _ in items])
        masks = torch.stack([m for _, m in items])
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((int(draws),) + tuple(latents.shape), generator=g)
        timesteps = torch.randint(lo, hi, (int(draws), n), generator=g)
        K = len(library.names)
        table = torch.zeros(n, K)
        batches = [(d, s) for d in range(int(draws)) for s in range(0, n, int(batch_size))]
        total, done = K * len(batches), 0
        memo: dict = {}
        with host.session(lora=recipe.lora, latent_shape=(int(batch_size),) + tuple(latents.shape[1:])):
            for k in range(K):
                for d, s in batches:
                    e = min(n, s + int(batch_size))
                    ids = torch.full((e - s,), k, dtype=torch.long)
                    table[s:e, k] += recipe.evaluate(latents[s:e], masks[s:e], noise[d, s:e], timesteps[d, s:e], ids, memo)
                    done += 1
                    if progress is not None:
                        progress(done, total)
                memo.pop(k, None)   # one identifier's encoding at a time (thousands of categories)
    table /= int(draws)
    rows = list(dataset.categories)
    truth = [library.index(dataset[i].category) for i in range(n)]
    row_of = [rows.index(dataset[i].category) for i in range(n)]
    loss = torch.zeros(len(rows), K)
    picks = torch.zeros(len(rows), K, dtype=torch.long)
    best = table.argmin(1)
    for r in range(len(rows)):
        sel = torch.tensor([x == r for x in row_of])
        loss[r] = table[sel].mean(0)
        picks[r] = torch.bincount(best[sel], minlength=K)
    return LibraryScore(rows, list(library.names), loss, picks, table, truth, int(draws), (lo, hi), int(seed))
