"""Installs the one ``SceneAttention`` object on a ComfyUI DiT (Flux.1, Z-Image): two text streams.

The object lives where it does on a UNet (``transformer_options["productscene"]``). A DiT has no
cross-attention layer to replace, so a DIFFUSION_MODEL wrapper carries the category-free prompt F
beside the prompt T through the model and hands every joint attention the block mask of
``productscene.dit.joint_mask`` (SPEC section 6). How each family is walked is one entry of
``WALKERS``:

- Flux (``comfy.ldm.flux.model.Flux``): the model's own forward runs on the text ``[T | F]`` with the
  mask as its ``attention_mask``, which ComfyUI hands every double- and single-stream block (and
  a ``patches_replace["dit"]`` block replace, through ``args["attn_mask"]``); every text token of
  Flux.1 sits at RoPE position 0, so F's positions are the ones it has alone.
- Z-Image (``comfy.ldm.lumina.model.NextDiT``): its forward builds one text stream's padding and
  positions inside, so the walker runs the model's own modules: the context refiner once per
  stream (each with its own pad tokens and positions), the noise refiner on the image, then every
  main layer over ``[T | F | image]`` with the mask and F placed as it is alone.

Attention itself stays ComfyUI's ``optimized_attention`` (with the mask), so another pack's
``optimized_attention_override`` sees every call. What cannot keep its effect is refused before
sampling (OUTER_SAMPLE wrapper), naming it.
"""
from __future__ import annotations

import functools

import comfy.ldm.common_dit
import comfy.patcher_extension
import torch

from productscene.attention import SceneAttention
from productscene.dit import family as dit_family_entry
from productscene.dit import grouped_attention, joint_groups, joint_mask, text_positions, token_grid
from productscene.errors import ProductSceneError

from .host import SCENE_KEY, WRAPPER_KEY, scene_of

STREAMS_KEY = "productscene.streams"  # per model call: (text, free, image) token counts, for tests and patches
OVERRIDE_KEY = "optimized_attention_override"


class JointAttention:
    """An ``optimized_attention_override`` for one model call: a call that carries this call's joint
    mask runs as ``productscene.dit.grouped_attention`` (two unmasked calls per row, the same
    attention; with the mask every query also scored the keys it may not read, about 1.4x the
    vanilla call's work on the CPU). The override another pack installed, if any, still gets every
    call as before, mask included; the attention function it is handed does the grouping."""

    def __init__(self, mask, groups, previous=None):
        self.mask, self.groups, self.previous = mask, groups, previous

    def __call__(self, func, *args, **kwargs):
        mask = kwargs["mask"] if "mask" in kwargs else (args[4] if len(args) > 4 else None)
        if mask is self.mask and kwargs.get("skip_reshape") and len(args) >= 4:
            func = functools.partial(self._grouped, func)
        return self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)

    def _grouped(self, func, q, k, v, heads, *args, **kwargs):
        mask = args[0] if args else kwargs.get("mask")
        if mask is not self.mask or not kwargs.get("skip_reshape"):
            return func(q, k, v, heads, *args, **kwargs)
        rest = {key: value for key, value in kwargs.items() if key not in ("mask", "skip_output_reshape")}
        out = grouped_attention(q, k, v, self.groups,
                                lambda qs, ks, vs: func(qs, ks, vs, heads, skip_output_reshape=True, **rest))
        if kwargs.get("skip_output_reshape"):
            return out
        b, _, length, dim = out.shape
        return out.transpose(1, 2).reshape(b, length, heads * dim)


def _with_joint_attention(options: dict, mask, groups) -> dict:
    """A copy of ``options`` whose attention override runs ``mask``'s calls as two unmasked calls."""
    if groups is None:
        return options
    return dict(options, **{OVERRIDE_KEY: JointAttention(mask, groups, options.get(OVERRIDE_KEY))})


def dit_family(model_patcher) -> str | None:
    """``"flux"`` / ``"zimage"`` for a model the DiT gate knows, else None (a UNet, or another DiT)."""
    net = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if net is None:
        return None
    import comfy.ldm.flux.model as flux
    import comfy.ldm.lumina.model as lumina
    if type(net) is flux.Flux and getattr(net.params, "vec_in_dim", None) is not None \
            and not getattr(net.params, "global_modulation", False):
        return "flux"
    if type(net) is lumina.NextDiT and getattr(net, "pad_tokens_multiple", None) is not None \
            and getattr(net, "clip_text_pooled_proj", None) is None:
        return "zimage"
    return None


def _chunks(options, batch: int) -> tuple:
    chunks = tuple(options.get("cond_or_uncond") or (0,))
    return chunks if batch % len(chunks) == 0 else (0,)


def _flux_streams(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                  transformer_options={}, **kwargs):
    """Flux: the model's own forward over ``[T | F]`` text with the block mask."""
    scene = transformer_options.get(SCENE_KEY)
    net = executor.class_obj
    latent_hw = tuple(x.shape[-2:])
    plan = scene.dit_streams(context, _chunks(transformer_options, x.shape[0]), latent_hw, net.patch_size) \
        if scene is not None and scene.gates else None
    if plan is None:
        return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
    free, valid, product, gated = plan
    grids = [token_grid(latent_hw, net.patch_size)] + [token_grid(tuple(r.shape[-2:]), net.patch_size)
                                                       for r in (ref_latents or ())]
    image = sum(h * w for h, w in grids)  # the latent's tokens, then reference latents' (Kontext)
    text = context.shape[1]
    transformer_options[STREAMS_KEY] = (text, free.shape[1], image)
    mask = kwargs["attention_mask"] = joint_mask(text, free.shape[1], image, product, gated, valid, dtype=x.dtype)
    options = _with_joint_attention(transformer_options, mask,
                                    joint_groups(text, free.shape[1], image, product, gated, valid))
    both = torch.cat([context, free.to(context)], dim=1)
    return executor(x, timestep, both, y, guidance, ref_latents, control, options, **kwargs)


def _pad_stream(net, feats):
    """A text stream after ``cap_embedder``, padded with the model's own pad token as it pads alone."""
    multiple = net.pad_tokens_multiple
    extra = (-feats.shape[1]) % multiple
    pad = net.cap_pad_token.to(device=feats.device, dtype=feats.dtype).unsqueeze(0).repeat(feats.shape[0], extra, 1)
    return torch.cat((feats, pad), dim=1)


def _zimage_streams(executor, x, timesteps, context, num_tokens, attention_mask=None, **kwargs):
    """Z-Image: the model's own modules walked with two text streams (see the module doc)."""
    options = kwargs.get("transformer_options", {})
    scene = options.get(SCENE_KEY)
    net = executor.class_obj
    bs, _, h0, w0 = x.shape
    plan = scene.dit_streams(context, _chunks(options, bs), (h0, w0), net.patch_size) \
        if scene is not None and scene.gates else None
    if plan is None:
        return executor(x, timesteps, context, num_tokens, attention_mask, **kwargs)
    free, valid, product, gated = plan
    p = net.patch_size
    x = comfy.ldm.common_dit.pad_to_patch_size(x, (p, p))
    t = net.t_embedder((1.0 - timesteps) * net.time_scale, dtype=x.dtype)
    cap_t = _pad_stream(net, net.cap_embedder(context))
    cap_f = net.cap_embedder(free.to(context))
    short = torch.arange(free.shape[1], device=cap_f.device)[None, :] >= valid.to(cap_f.device)[:, None]
    if short.any():  # a row whose gate's F is shorter (several gates): the model's pad token, as alone
        cap_f = torch.where(short[:, :, None], net.cap_pad_token.to(cap_f)[None], cap_f)
    cap_f = _pad_stream(net, cap_f)
    text, nf = cap_t.shape[1], cap_f.shape[1]
    valid = torch.full_like(valid, nf)
    pos_t, pos_f = text_positions(dit_family_entry("zimage"), text, nf)
    b, c, hp, wp = x.shape
    ht, wt = hp // p, wp // p
    img = net.x_embedder(x.view(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2))
    rope = options.get("rope_options") or {}
    ids_x = torch.zeros(b, ht * wt, 3, dtype=torch.float32, device=x.device)
    ids_x[:, :, 0] = text + 1
    ids_x[:, :, 1] = (torch.arange(ht, dtype=torch.float32, device=x.device) * rope.get("scale_y", 1.0)
                      + rope.get("shift_y", 0.0)).view(-1, 1).repeat(1, wt).flatten()
    ids_x[:, :, 2] = (torch.arange(wt, dtype=torch.float32, device=x.device) * rope.get("scale_x", 1.0)
                      + rope.get("shift_x", 0.0)).view(1, -1).repeat(ht, 1).flatten()
    extra = (-img.shape[1]) % net.pad_tokens_multiple
    img = torch.cat((img, net.x_pad_token.to(device=img.device, dtype=img.dtype).unsqueeze(0).repeat(b, extra, 1)), 1)
    ids_x = torch.nn.functional.pad(ids_x, (0, 0, 0, extra))
    ids_t = torch.zeros(b, text, 3, device=x.device)
    ids_t[:, :, 0] = pos_t.to(x.device)
    ids_f = torch.zeros(b, nf, 3, device=x.device)
    ids_f[:, :, 0] = pos_f.to(x.device)
    freqs = net.rope_embedder(torch.cat((ids_t, ids_f, ids_x), dim=1)).movedim(1, 2).to(x.device)
    for layer in net.context_refiner:  # text-only parts: once per stream
        cap_t = layer(cap_t, None, freqs[:, :text], transformer_options=options)
        cap_f = layer(cap_f, None, freqs[:, text:text + nf], transformer_options=options)
    for layer in net.noise_refiner:
        img = layer(img, None, freqs[:, text + nf:], t, transformer_options=options)
    options[STREAMS_KEY] = (text, nf, img.shape[1])
    mask = joint_mask(text, nf, img.shape[1], product, gated, valid, dtype=img.dtype)
    joint = _with_joint_attention(options, mask, joint_groups(text, nf, img.shape[1], product, gated, valid))
    full = torch.cat((cap_t, cap_f, img), dim=1)
    for i, layer in enumerate(net.layers):
        options["block_index"] = joint["block_index"] = i
        full = layer(full, mask, freqs, t, transformer_options=joint)
    out = net.final_layer(full, t)
    out = net.unpatchify(out, [(hp, wp)] * b, [text + nf] * b, return_tensor=True)[:, :, :h0, :w0]
    return -out


WALKERS = {"flux": _flux_streams, "zimage": _zimage_streams}


def install_dit(model_patcher, scene: SceneAttention, family: str):
    """A clone of ``model_patcher`` with ``scene`` merged into its attention object and the two-stream
    walker of ``family`` as its DIFFUSION_MODEL wrapper."""
    scene.check_dit()
    dit_family_entry(family)
    m = model_patcher.clone()
    existing = scene_of(m)
    merged = existing.merged(scene) if existing else scene
    merged.check_dit()
    m.model_options.setdefault("transformer_options", {})[SCENE_KEY] = merged
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WALKERS[family]),
                          (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, _check_dit_before_sampling)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return m


def foreign_after_walker(options: dict, family: str) -> list[str]:
    """What another pack put on the model that the walker would skip: on Z-Image, a DIFFUSION_MODEL
    wrapper inside ours (it would never run) and the model's per-block ``patches`` ComfyUI calls
    from the forward the walker replaces."""
    if family != "zimage":
        return []
    wrappers = options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    keys = list(wrappers)
    inner = keys[keys.index(WRAPPER_KEY) + 1:] if WRAPPER_KEY in keys else []
    found = [f"DIFFUSION_MODEL wrapper '{k}'" for k in inner if wrappers[k]]
    found += [f"patches['{k}']" for k in ("noise_refiner", "double_block", "post_input")
              if options.get("patches", {}).get(k)]
    return found


def _masks_rows(mask) -> bool:
    """An attention mask that hides some text rows. Z-Image's encoder always adds one, all ones for
    a plain prompt; ComfyUI itself passes it on only when it hides something (numel != sum)."""
    return mask is not None and torch.numel(mask) != float(mask.sum())


def _check_dit_before_sampling(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Before the first step: masks against the latent, the gate's conditioning among the positive
    ones, no attention mask in the conditioning (it would be replaced), nothing the walker skips."""
    guider = executor.class_obj
    options = guider.model_options.get("transformer_options", {})
    scene = options.get(SCENE_KEY)
    if scene is not None and scene.gates:
        scene.check_dit()
        scene.check_batch(noise.shape[0])
        scene.check_aspect(tuple(noise.shape[-2:]))
        conds = getattr(guider, "conds", None) or {}
        scene.check_contexts([c.get("cross_attn") for c in conds.get("positive", [])])
        for name, cs in conds.items():
            if any(_masks_rows(c.get("attention_mask")) for c in cs):
                raise ProductSceneError(
                    f"conditioning: the {name} conditioning carries an attention mask (a regional or masked "
                    "prompt); Masked Category Attention on a DiT sets the attention mask itself. Remove the "
                    "conditioning's attention mask, or leave the model ungated.")
        patcher = getattr(guider, "model_patcher", None)
        family = dit_family(patcher) if patcher is not None else None
        skipped = foreign_after_walker(options, family)
        if skipped:
            raise ProductSceneError(
                f"model: {skipped[0]} was added to the Z-Image model after Masked Category Attention, which walks "
                "the model itself and would skip it. Connect that node before Masked Category Attention.")
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
