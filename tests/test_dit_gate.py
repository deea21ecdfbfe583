"""Masked Category Attention on DiT joint attention (SPEC section 6), on tiny Flux.1 and Z-Image
models built with ComfyUI's own classes (devkit/dit_models.py), sampled by ComfyUI's own sampler.

Two categories give two prompts T (the identifier's embedding differs) over one category-free
prompt F; each gates a clone of the model and ``comfy.sample.sample`` runs one CFG step. A foreign
``optimized_attention_override`` (what another pack would install) records every attention call
of the model: q, k, v after RoPE and the mask. Then, per joint attention (Flux double and single
blocks, Z-Image main layers), run A's image-token and F states are held fixed and only T's rows
are swapped for run B's: the product image tokens' attention output must be bit-identical
(max |delta| = 0.0), the background's must change, and T's rows must get exactly zero gradient
through product tokens. The gate this design replaces (one stream, product queries skip only the
identifier's own rows) fails the same check on the same states.
"""
from __future__ import annotations

import pytest
import torch

import comfy.patcher_extension
import comfy.sample

from productscene.attention import CategoryGate, SceneAttention
from productscene.dit import DIT_FAMILIES, identifier_only_mask, joint_mask
from productscene.errors import ProductSceneError
from productscene.prompt import CategoryTokens
from devkit import comfy_env
from devkit import dit_models as dm

pack = comfy_env.import_pack()
dit_host = pack.nodes.dit_host
gate_node = pack.nodes.category_attention.MaskedCategoryAttention

WIDTH = {"flux": 4096, "zimage": 2560}
CAUSAL = {"flux": False, "zimage": True}
BUILD = {"flux": dm.tiny_flux, "zimage": dm.tiny_zimage}
IDENT_ROW = 2
LATENT = (8, 10)  # odd token grid on Flux/Z-Image: 4 x 5 tokens


def prompts(fam: str, category: int):
    """(T, F): the prompt encoded with category ``category``'s identifier at row 2, and without it."""
    enc = dm.StandInEncoder(WIDTH[fam], CAUSAL[fam])
    words = dm.prompt_embeddings(7, WIDTH[fam])
    return enc(dm.with_identifier(words, dm.identifier(WIDTH[fam], category), IDENT_ROW)), enc(words)


def conditioning(fam: str, context, free):
    """Category Tokens' CONDITIONING: T as the context, every global vector from F."""
    extra = {"pooled_output": free.mean(1)[:, :768].clone(), "guidance": 3.5} if fam == "flux" else {}
    return [[context, extra]]


def product_mask(full: bool = False):
    mask = torch.zeros(1, 64, 80)
    if full:  # one background pixel (a mask must leave some); grow_latent_px=1 makes every token product
        mask += 1
        mask[:, 0, 0] = 0
        return mask
    mask[:, 8:40, 16:48] = 1
    return mask


class Recorder:
    """A foreign ``optimized_attention_override``: records each call and runs ComfyUI's attention."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, *args, **kwargs):
        out = func(*args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        self.calls.append(dict(func=func, q=args[0], k=args[1], v=args[2], heads=args[3], mask=mask, out=out,
                               streams=options.get(dit_host.STREAMS_KEY)))
        return out


def gated_model(fam, gate, scene=None, recorder=None):
    m = dit_host.install_dit(BUILD[fam](), scene or SceneAttention().with_gate(gate), fam)
    if recorder is not None:
        m.model_options["transformer_options"]["optimized_attention_override"] = recorder
    return m


def run(model, positive, negative, steps=1, seed=0, batch=1):
    latent = torch.zeros(batch, 16, *LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 3.0, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def two_categories(fam, mask=None, scene_of=None, grow=0):
    """For categories 0 and 1: (recorder, samples, gate) of one gated CFG step."""
    out = []
    for category in (0, 1):
        t, f = prompts(fam, category)
        gate = CategoryGate(product_mask() if mask is None else mask, f, contexts=[t], grow_latent_px=grow)
        rec = Recorder()
        scene = scene_of(gate) if scene_of else None
        samples = run(gated_model(fam, gate, scene, rec), conditioning(fam, t, f), conditioning(fam, f * 0.5, f))
        out.append((rec, samples, gate))
    return out


def attend(call, q, k, v, mask):
    return call["func"](q, k, v, call["heads"], mask=mask, skip_reshape=True)


def joint_calls(rec):
    return [c for c in rec.calls if c["mask"] is not None and c["streams"] is not None
            and c["q"].shape[2] == sum(c["streams"])]


def product_rows(gate, streams, fam):
    text, free, image = streams
    tokens = gate.region.dit_tokens(LATENT, DIT_FAMILIES[fam].patch)[0]
    rows = torch.zeros(text + free + image, dtype=torch.bool)
    rows[text + free:text + free + tokens.numel()] = tokens
    background = torch.zeros_like(rows)
    background[text + free:text + free + tokens.numel()] = ~tokens
    return rows, background


def swap_text(a, b, text):
    """``a`` with its T rows (sequence dim 2) taken from ``b``."""
    out = a.clone()
    out[:, :, :text] = b[:, :, :text]
    return out


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_product_tokens_attention_is_independent_of_the_category_in_every_joint_block(fam):
    (rec_a, _, gate), (rec_b, _, _) = two_categories(fam)
    calls_a, calls_b = joint_calls(rec_a), joint_calls(rec_b)
    expected = {"flux": 2 + 2, "zimage": 2}[fam]  # double + single blocks / main layers, one CFG batch each
    assert len(calls_a) == len(calls_b) == expected
    cond = 0  # the CFG batch is [cond, uncond]: the gate acts on the cond row
    for a, b in zip(calls_a, calls_b):
        text, free, image = a["streams"]
        product, background = product_rows(gate, a["streams"], fam)
        assert product.any() and background.any()
        q, k, v = (swap_text(a[n], b[n], text) for n in ("q", "k", "v"))
        held = attend(a, a["q"], a["k"], a["v"], a["mask"])
        mixed = attend(a, q, k, v, a["mask"])
        assert (mixed[cond, product] - held[cond, product]).abs().max().item() == 0.0
        assert (mixed[cond, text:text + free] - held[cond, text:text + free]).abs().max().item() == 0.0  # F never reads T
        assert (mixed[cond, background] - held[cond, background]).abs().max().item() > 1e-4
        # the gate this design replaces: one stream [T | image], product queries skip the identifier's rows
        keep = torch.cat([torch.arange(text), torch.arange(text + free, text + free + image)])
        one = [t[:, :, keep] for t in (a["q"], a["k"], a["v"])]
        one_b = [t[:, :, keep] for t in (b["q"], b["k"], b["v"])]
        counter = identifier_only_mask(text, image, product[None, text + free:].clone(), [IDENT_ROW], dtype=a["q"].dtype)
        counter = counter.expand(a["q"].shape[0], -1, -1, -1)
        prod_one = product[keep]
        held1 = attend(a, *one, counter)
        mixed1 = attend(a, *(swap_text(x, y, text) for x, y in zip(one, one_b)), counter)
        assert (mixed1[cond, prod_one] - held1[cond, prod_one]).abs().max().item() > 1e-4


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_the_identifier_gets_zero_gradient_through_product_tokens_in_every_joint_block(fam):
    (rec, _, gate), = two_categories(fam)[:1]
    for call in joint_calls(rec):
        text = call["streams"][0]
        product, background = product_rows(gate, call["streams"], fam)
        for rows, zero in ((product, True), (background, False)):
            t_rows = [call[n][:, :, :text].detach().clone().requires_grad_(True) for n in ("q", "k", "v")]
            q, k, v = (torch.cat([t, call[n][:, :, text:].detach()], dim=2) for t, n in zip(t_rows, ("q", "k", "v")))
            attend(call, q, k, v, call["mask"])[0, rows].sum().backward()
            grad = max(t.grad.abs().max().item() for t in t_rows)
            assert (grad == 0.0) if zero else (grad > 0.0)


def test_z_image_refiners_keep_the_streams_apart():
    """Context refiner: T and F refined separately (F's calls identical for two categories, T's not);
    noise refiner: image only, identical."""
    (rec_a, _, _), (rec_b, _, _) = two_categories("zimage")
    gated_call = next(i for i, c in enumerate(rec_a.calls) if c["streams"] is not None)  # cond runs first
    text_calls = [(a, b) for a, b in zip(rec_a.calls[:gated_call], rec_b.calls) if a["mask"] is None]
    assert len(text_calls) == 2 * 2 + 2  # two refiner layers on T and on F, two noise refiner layers
    same = [(a["out"] - b["out"]).abs().max().item() == 0.0 for a, b in text_calls]
    assert same == [False, True, False, True, True, True]


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_whole_product_mask_makes_the_prediction_independent_of_the_category(fam):
    """Nothing reads T when every image token is product: the sampled latent is bit-identical for two
    categories. With a partial mask the background's category reaches product tokens through the
    image tokens they attend (as self-attention and convolutions do on a UNet): not identical."""
    (_, full_a, _), (_, full_b, _) = two_categories(fam, mask=product_mask(full=True), grow=1)
    assert (full_a - full_b).abs().max().item() == 0.0
    (_, part_a, _), (_, part_b, _) = two_categories(fam)
    assert (part_a - part_b).abs().max().item() > 1e-4


class UngatedStreams(SceneAttention):
    """Carries F through the model but gates no image token: must be the vanilla model."""

    def dit_streams(self, *args, **kwargs):
        plan = super().dit_streams(*args, **kwargs)
        return None if plan is None else (*plan[:3], torch.zeros_like(plan[3]))


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_carrying_f_keeps_t_and_the_image_where_they_are_alone(fam):
    """Positions and padding as each stream has alone: with F carried but read by no image token, the
    walker's prediction is the vanilla model's (float rounding apart)."""
    t, f = prompts(fam, 0)
    gate = CategoryGate(product_mask(), f, contexts=[t])
    carried = run(gated_model(fam, gate, UngatedStreams([gate])), conditioning(fam, t, f),
                  conditioning(fam, f * 0.5, f), steps=2)
    vanilla = run(BUILD[fam]().clone(), conditioning(fam, t, f), conditioning(fam, f * 0.5, f), steps=2)
    gated = run(gated_model(fam, gate), conditioning(fam, t, f), conditioning(fam, f * 0.5, f), steps=2)
    assert torch.allclose(carried, vanilla, atol=1e-4, rtol=1e-4)
    assert (gated - vanilla).abs().max().item() > 1e-3


def test_flux_global_vector_the_model_receives_is_independent_of_the_category():
    seen = []

    def record_y(executor, x, timestep, context, y=None, *args, **kwargs):
        seen.append(y.clone())
        return executor(x, timestep, context, y, *args, **kwargs)

    for category in (0, 1):
        t, f = prompts("flux", category)
        m = gated_model("flux", CategoryGate(product_mask(), f, contexts=[t]))
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.y", record_y)
        run(m, conditioning("flux", t, f), conditioning("flux", f * 0.5, f))
    assert len(seen) % 2 == 0 and len(seen) >= 2  # cond and uncond, together or one call each
    half = len(seen) // 2
    assert all((a - b).abs().max().item() == 0.0 for a, b in zip(seen[:half], seen[half:]))


def test_flux_foreign_dit_block_replace_keeps_its_effect_and_the_gate():
    """Another pack's ``patches_replace["dit"]`` on a double and a single block runs (and gets the
    gate's mask through ``args["attn_mask"]``); product tokens stay exact."""
    seen = []

    def foreign(args, extra):
        seen.append(args["attn_mask"])
        out = extra["original_block"](args)
        out["img"] = out["img"] * 1.01
        return out

    results = []
    for patched in (False, True):
        per_category = []
        for category in (0, 1):
            t, f = prompts("flux", category)
            gate = CategoryGate(product_mask(), f, contexts=[t])
            rec = Recorder()
            m = gated_model("flux", gate, recorder=rec)
            if patched:
                m.set_model_patch_replace(foreign, "dit", "double_block", 0)
                m.set_model_patch_replace(foreign, "dit", "single_block", 1)
            per_category.append((rec, run(m, conditioning("flux", t, f), conditioning("flux", f * 0.5, f)), gate))
        results.append(per_category)
    gated_calls = [s for s in seen if s is not None]  # the uncond call (no gated row) runs unmasked
    assert len(gated_calls) == 2 * 2 and all(s.shape[-1] == s.shape[-2] and s.isinf().any() for s in gated_calls)
    assert (results[0][0][1] - results[1][0][1]).abs().max().item() > 1e-4  # the foreign patch acted
    (rec_a, _, gate), (rec_b, _, _) = results[1]
    for a, b in zip(joint_calls(rec_a), joint_calls(rec_b)):
        text = a["streams"][0]
        product, _ = product_rows(gate, a["streams"], "flux")
        mixed = attend(a, *(swap_text(a[n], b[n], text) for n in ("q", "k", "v")), a["mask"])
        held = attend(a, a["q"], a["k"], a["v"], a["mask"])
        assert (mixed[0, product] - held[0, product]).abs().max().item() == 0.0


def test_refused_before_sampling_what_would_lose_its_effect():
    t, f = prompts("zimage", 0)
    gate = CategoryGate(product_mask(), f, contexts=[t])
    m = gated_model("zimage", gate)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "other.pack",
                           lambda executor, *a, **k: executor(*a, **k))
    with pytest.raises(ProductSceneError, match="other.pack"):
        run(m, conditioning("zimage", t, f), conditioning("zimage", f * 0.5, f))
    t, f = prompts("flux", 0)
    m = gated_model("flux", CategoryGate(product_mask(), f, contexts=[t]))
    hides = torch.ones(1, 8, 8)
    hides[..., -2:] = 0      # a regional prompt's mask hides some rows: it would be replaced
    masked = [[t, dict(conditioning("flux", t, f)[0][1], attention_mask=hides)]]
    with pytest.raises(ProductSceneError, match="attention mask"):
        run(m, masked, conditioning("flux", f * 0.5, f))
    # an all-ones mask hides nothing (Z-Image's encoder adds one to every prompt): accepted
    plain = [[t, dict(conditioning("flux", t, f)[0][1], attention_mask=torch.ones(1, 8, 8))]]
    assert torch.isfinite(run(m, plain, conditioning("flux", f * 0.5, f))).all()
    other, _ = prompts("flux", 1)
    with pytest.raises(ProductSceneError, match="Category Tokens"):
        run(m, conditioning("flux", other * 2.0, f), conditioning("flux", f * 0.5, f))


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_node_patches_dits_and_refuses_a_blend(fam):
    t, f = prompts(fam, 0)
    tokens = CategoryTokens(library_path="", category="c0", family=fam, rows=(IDENT_ROW,), context_rows=t.shape[1],
                            vectors={}, free_context=f, contexts=(t,))
    patched = gate_node.execute(BUILD[fam](), product_mask(), tokens, 1.0, 0, 0.0).args[0]
    opts = patched.model_options["transformer_options"]
    walker = patched.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "productscene")
    assert opts["productscene"].gates and walker == [dit_host.WALKERS[fam]]
    assert not BUILD[fam]().model_options.get("transformer_options", {}).get("productscene")
    with pytest.raises(ProductSceneError, match="strength"):
        gate_node.execute(BUILD[fam](), product_mask(), tokens, 0.5, 0, 0.0)


def test_node_names_a_dit_it_does_not_know():
    """Flux.2-style global modulation is another family: refused by name, not patched as a UNet."""
    t, f = prompts("flux", 0)
    tokens = CategoryTokens(library_path="", category="c0", family="flux", rows=(IDENT_ROW,), context_rows=t.shape[1],
                            vectors={}, free_context=f, contexts=(t,))
    model = dm.tiny_flux(seed=99)  # its own instance: the params are changed in place
    model.model.diffusion_model.params = type(model.model.diffusion_model.params)(
        **dict(vars(model.model.diffusion_model.params), global_modulation=True))
    with pytest.raises(ProductSceneError, match="this model is a Flux"):
        gate_node.execute(model, product_mask(), tokens, 1.0, 0, 0.0)


def test_grouped_joint_attention_is_the_masked_attention():
    """The gate's joint calls run as two unmasked calls per row (``dit.grouped_attention``); they
    compute the masked call's attention: gated and ungated rows, F padding, image tokens after the
    grid."""
    from productscene.dit import grouped_attention, joint_groups
    g = torch.Generator().manual_seed(3)
    text, free, image = 7, 5, 20
    product = torch.rand(3, 16, generator=g) > 0.6
    gated = torch.tensor([True, False, True])
    valid = torch.tensor([5, 2, 4])
    mask = joint_mask(text, free, image, product, gated, valid)
    groups = joint_groups(text, free, image, product, gated, valid)
    q, k, v = (torch.randn(3, 2, text + free + image, 8, generator=g, dtype=torch.float64) for _ in range(3))
    masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.double())
    grouped = grouped_attention(q, k, v, groups, torch.nn.functional.scaled_dot_product_attention)
    assert (grouped - masked).abs().max() < 1e-12
    assert joint_groups(text, free, image, product, gated, torch.tensor([5, 0, 4])) is None  # no real F: the mask


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_the_joint_calls_run_grouped_behind_a_foreign_override(fam):
    """A foreign ``optimized_attention_override`` still sees every joint call with its mask, and
    the attention function it is handed is the grouped one."""
    (rec, _, _), _ = two_categories(fam)
    calls = joint_calls(rec)
    assert calls and all(getattr(c["func"], "func", None) is not None
                         and c["func"].func.__name__ == "_grouped" for c in calls)
