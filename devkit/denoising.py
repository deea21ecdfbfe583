"""Plain denoising pretraining of a whole UNet or DiT (the world bases, ``devkit/world_model.py``,
``devkit/dit_world.py``).

Group ``unet``: every parameter of ``host.unet``. Each step draws latents, one of a few
category-agnostic prompts (encoded once, no gradient), noise and timesteps over the whole
schedule; the loss is the plain noise-prediction MSE. No gate, no LoRA, no identifier: what the
model learns here is generic denoising of the data, which is what a real user's base model brings.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from productscene.errors import ProductSceneError
from productscene.prompt import Prompt
from productscene.train.recipes import DiffusionHost


class DenoisingRecipe:
    def __init__(self, host: DiffusionHost, latents: torch.Tensor, prompts: Sequence[str], batch_size: int = 8):
        if latents.dim() != 4 or not len(latents):
            raise ProductSceneError(f"latents: expected [N, C, h, w] with N >= 1, got {list(latents.shape)}")
        if not prompts:
            raise ProductSceneError("prompts: expected at least one prompt")
        self.host = host
        self.latents = latents.float()
        self.batch_size = int(batch_size)
        self.prompts = list(prompts)
        self._cond = None

    def conditioning(self) -> torch.Tensor:
        return self.encoded().cond

    def encoded(self):
        """Every prompt encoded once (no gradient), with its global vector where the model takes
        one (Flux.1's pooled CLIP-L output)."""
        if self._cond is None:
            from dataclasses import replace
            with torch.no_grad():
                enc = self.host.encode([Prompt(p) for p in self.prompts])
            self._cond = replace(enc, cond=enc.cond.detach(),
                                 pooled=enc.pooled.detach() if enc.pooled is not None else None)
        return self._cond

    def parameter_groups(self):
        return {"unet": list(self.host.unet.parameters())}

    def batch(self, step: int, generator: torch.Generator):
        b = self.batch_size
        idx = torch.randint(len(self.latents), (b,), generator=generator)
        latents = self.latents[idx]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, int(self.host.num_timesteps), (b,), generator=generator)
        prompt = torch.randint(len(self.prompts), (b,), generator=generator)
        return {"latents": latents, "noise": noise, "timesteps": t, "prompt": prompt}

    def predict(self, batch) -> torch.Tensor:
        dev = self.host.device
        enc = self.encoded().select(batch["prompt"])
        sigma = self.host.sigmas(batch["timesteps"].to(dev))
        x = self.host.add_noise(batch["latents"].to(dev), batch["noise"].to(dev), sigma)
        return self.host.predict_noise(x, sigma, enc, None)

    def loss(self, batch, step):
        pred = self.predict(batch)
        return F.mse_loss(pred.float(), batch["noise"].to(pred.device).float()), {}

    @torch.no_grad()
    def evaluate(self, batch) -> float:
        """The same loss without gradients (for a fixed held-out batch)."""
        pred = self.predict(batch)
        return float(F.mse_loss(pred.float(), batch["noise"].to(pred.device).float()))

    def describe(self) -> dict:
        return {"recipe": "denoising", "prompts": self.prompts, "batch_size": self.batch_size,
                "items": len(self.latents)}
