"""The training engine (host-free core) and the LoRA's ComfyUI key format."""
from __future__ import annotations

import json

import pytest
import torch

from productscene.errors import ProductSceneError
from productscene.files import read_header
from productscene.train.engine import Phase, Trainer, loss_graph, read_checkpoint_info
from productscene.train.lora import LoRA


class ToyRecipe:
    """Two groups fitting y = x @ W with noisy targets drawn from the engine's generator."""

    def __init__(self, scale: float = 1.0):
        g = torch.Generator().manual_seed(123)
        self.true = torch.randn(4, 3, generator=g)
        self.a = torch.nn.Parameter(torch.zeros(4, 3))
        self.b = torch.nn.Parameter(torch.zeros(3))
        self.scale = scale

    def parameter_groups(self):
        return {"a": [self.a], "b": [self.b]}

    def batch(self, step, generator):
        x = torch.randn(8, 4, generator=generator)
        y = x @ self.true + 0.5 + 0.01 * torch.randn(8, 3, generator=generator)
        return x, y

    def loss(self, batch, step):
        x, y = batch
        pred = x @ self.a + self.b
        return self.scale * ((pred - y) ** 2).mean(), {"fit": float(((pred - y) ** 2).mean().detach())}


def _trainer(recipe, tmp_path=None, **kw):
    phases = kw.pop("phases", [Phase("a", 6, {"a": 0.05}), Phase("both", 6, {"a": 0.01, "b": 0.02})])
    ckpt = tmp_path / "ckpt.safetensors" if tmp_path is not None else None
    return Trainer(recipe, phases, seed=5, checkpoint_path=ckpt, **kw)


def test_phases_switch_trainable_groups_and_learning_rates():
    r = ToyRecipe()
    seen = []
    trainer = _trainer(r, phases=[Phase("only_a", 3, {"a": 0.1}), Phase("only_b", 3, {"b": 0.01})])
    trainer.progress = lambda step, total, loss: seen.append(
        (step, dict(trainer.current_lr()), r.a.detach().clone(), r.b.detach().clone(), r.a.requires_grad, r.b.requires_grad))
    result = trainer.run()
    assert result.steps_done == 6 and not result.cancelled and len(result.history) == 6
    # phase 1: a moves, b stays exactly zero and is frozen
    for step, lr, a, b, ga, gb in seen[:3]:
        assert lr == {"a": 0.1, "b": 0.0} and ga and not gb
        assert torch.count_nonzero(b) == 0
    assert not torch.equal(seen[0][2], seen[2][2])
    # phase 2: a frozen at its phase-1 value, b moves with lr 0.01 (Adam: |step| <= lr ~ 0.01)
    a_end = seen[2][2]
    for step, lr, a, b, ga, gb in seen[3:]:
        assert lr == {"a": 0.0, "b": 0.01} and not ga and gb
        assert torch.equal(a, a_end)
    first_b = seen[3][3]
    assert 0 < first_b.abs().max() <= 0.0101


def test_grad_norm_is_clipped_to_one():
    r = ToyRecipe(scale=1e4)  # huge gradients
    trainer = _trainer(r, phases=[Phase("p", 3, {"a": 1e-3, "b": 1e-3})])
    norms = []

    def pre_step(opt, args, kwargs):
        grads = [p.grad for pg in opt.param_groups for p in pg["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    trainer.optimizer.register_step_pre_hook(pre_step)
    trainer.run()
    assert len(norms) == 3
    assert all(n <= 1.0 + 1e-4 for n in norms), norms
    assert all(e["grad_norm"] > 10.0 for e in trainer.logs)  # the logged (pre-clip) norm was large


def test_no_clip_when_disabled():
    r = ToyRecipe(scale=1e4)
    trainer = _trainer(r, phases=[Phase("p", 1, {"a": 1e-3})], clip_grad=None)
    norms = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: norms.append(float(r.a.grad.norm())))
    trainer.run()
    assert norms[0] > 10.0


def test_cancel_leaves_a_checkpoint_and_resume_matches_uninterrupted(tmp_path):
    full = ToyRecipe()
    full_result = _trainer(full).run()

    # cancelled after 4 of 12 steps (the stop request is checked before every step)
    part = ToyRecipe()
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 4

    t1 = _trainer(part, tmp_path, should_stop=should_stop)
    r1 = t1.run()
    assert r1.cancelled and r1.steps_done == 4 and r1.checkpoint == str(tmp_path / "ckpt.safetensors")
    meta, index = read_header(r1.checkpoint)
    assert meta["productscene.format"] == "training_checkpoint" and meta["productscene.format_version"] == "1"
    assert json.loads(meta["step"]) == 4 and "rng.generator" in index and "optim.a.0.exp_avg" in index
    info = read_checkpoint_info(r1.checkpoint)
    assert info["step"] == 4 and len(info["history"]) == 4

    # a fresh process-like start: new recipe object (zeros), resumed from the file
    resumed = ToyRecipe()
    t2 = _trainer(resumed, tmp_path)
    r2 = t2.run(resume=tmp_path / "ckpt.safetensors")
    assert not r2.cancelled and r2.steps_done == 12
    torch.testing.assert_close(resumed.a, full.a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.b, full.b, rtol=1e-6, atol=1e-7)
    assert r2.history == pytest.approx(full_result.history, rel=1e-6, abs=1e-7)


def test_interrupt_exception_saves_state_then_propagates(tmp_path):
    class Interrupted(Exception):
        pass

    r = ToyRecipe()

    def progress(step, total, loss):
        if step == 5:
            raise Interrupted()

    t = _trainer(r, tmp_path, progress=progress)
    with pytest.raises(Interrupted):
        t.run()
    assert read_checkpoint_info(tmp_path / "ckpt.safetensors")["step"] == 5
    again = ToyRecipe()
    _trainer(again, tmp_path).load_checkpoint(tmp_path / "ckpt.safetensors")
    torch.testing.assert_close(again.a, r.a)


class PreviewingToy(ToyRecipe):
    """A toy that can draw a preview: an image made from its weights and random values it draws."""

    def preview(self, generator):
        noise = torch.rand(1, 4, 3, 3, generator=generator) * 0.1
        return (self.a.detach()[None, :, :, None].expand(1, 4, 3, 3) + noise).sigmoid()


def test_previews_every_n_steps_and_at_the_end_never_change_training():
    plain = _trainer(ToyRecipe()).run()
    shown = []
    recipe = PreviewingToy()
    result = _trainer(recipe, preview_every=5, on_preview=lambda step, image: shown.append((step, image))).run()
    assert [step for step, _ in shown] == [5, 10, 12]
    assert all(image.shape == (1, 4, 3, 3) and image.min() >= 0 and image.max() <= 1 for _, image in shown)
    assert not torch.equal(shown[0][1], shown[-1][1])  # the model moved between previews
    assert result.history == plain.history  # the previews drew from their own generator, not training's
    # the same seed every time: previews of one state are identical (they compare across steps)
    trainer = _trainer(PreviewingToy(), preview_every=0, on_preview=lambda *a: None)
    assert torch.equal(trainer.render_preview(), trainer.render_preview())
    # a recipe that cannot draw one gets no call; a negative cadence is refused
    assert _trainer(ToyRecipe(), preview_every=1, on_preview=lambda *a: shown.append(a)).run() and len(shown) == 3
    with pytest.raises(ProductSceneError, match="preview_every"):
        _trainer(PreviewingToy(), preview_every=-1)


def test_checkpoint_every_n_steps(tmp_path):
    steps_saved = []
    r = ToyRecipe()
    t = _trainer(r, tmp_path, checkpoint_every=5)
    orig = t.save_checkpoint
    t.save_checkpoint = lambda path: (steps_saved.append(t.step), orig(path))[1]
    t.run()
    assert steps_saved == [5, 10, 12]


def test_resume_refuses_a_checkpoint_of_other_trainables(tmp_path):
    r = ToyRecipe()
    _trainer(r, tmp_path, phases=[Phase("p", 2, {"a": 0.1})]).run()

    class Other(ToyRecipe):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(5, 3))

    with pytest.raises(ProductSceneError, match="resume"):
        _trainer(Other(), tmp_path).run(resume=tmp_path / "ckpt.safetensors")


def test_bad_configuration_is_reported():
    with pytest.raises(ProductSceneError, match="unknown parameter group"):
        Trainer(ToyRecipe(), [Phase("p", 2, {"zz": 0.1})])
    with pytest.raises(ProductSceneError, match="learning rate"):
        Phase("p", 2, {"a": 0.0})


def test_nan_loss_stops_with_a_clear_error():
    class Nan(ToyRecipe):
        def loss(self, batch, step):
            loss, logs = super().loss(batch, step)
            return loss * float("nan"), logs

    with pytest.raises(ProductSceneError, match="loss became nan"):
        Trainer(Nan(), [Phase("p", 2, {"a": 0.1})]).run()


def test_loss_graph_image():
    img = loss_graph([3.0, 2.5, 2.0, 1.0, 0.5], width=200, height=100)
    assert img.shape == (1, 100, 200, 3) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.min()) < 0.9


# ------------------------------------------------------------------------------------ LoRA
def test_lora_hooks_match_comfys_lora_loader_and_weight_wrappers_and_are_removed(sd15):
    """The file the LoRA saves, applied by ComfyUI's own LoRA loader, gives the model the hooks
    gave; so does the same LoRA as ComfyUI weight wrappers (the alternative lora.py measured);
    the hooks leave the shared model untouched."""
    import comfy.lora
    import comfy.model_management as mm
    import comfy.sd

    model = sd15.model
    unet = model.model.diffusion_model
    lora = LoRA(unet, rank=4, alpha=2.0, seed=0)
    assert all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in lora.paths)
    assert any(".attn1." in p for p in lora.paths) and any(".attn2." in p for p in lora.paths)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for layer in lora.layers.values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.05)
    sd = lora.comfy_state_dict()
    key = "diffusion_model." + lora.paths[0]
    assert {key + ".lora_up.weight", key + ".lora_down.weight", key + ".alpha"} <= set(sd)

    # ComfyUI's own key mapping accepts every key
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    assert len(patches) == len(lora.paths)

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([2.0])
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(3)) * 0.1

    def run(patcher):
        mm.load_models_gpu([patcher])
        with torch.no_grad():
            return patcher.model.apply_model(x, sigma, c_crossattn=ctx)

    plain = run(model)
    with lora.attached():
        hooked = run(model)
    assert torch.equal(run(model), plain)  # hooks gone: the shared model is untouched
    assert (hooked - plain).abs().max() > 1e-4

    patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
    try:
        merged = run(patched)
    finally:
        patched.unpatch_model()
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-4)

    wrapped = model.clone()
    for path in lora.paths:
        layer = lora.layer(path)
        wrapped.add_weight_wrapper(f"diffusion_model.{path}.weight",
                                   lambda w, layer=layer: w + (layer.up @ layer.down * layer.scale).to(w.dtype))
    torch.testing.assert_close(run(wrapped), hooked, rtol=1e-4, atol=1e-4)
    assert torch.equal(run(model), plain)

    again = LoRA(unet, rank=4, alpha=2.0, seed=9)
    again.load_comfy_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), lora.parameters()))


def test_gradient_checkpointing_gives_the_same_gradients_and_restores_forward():
    from productscene.train.engine import gradient_checkpointing

    calls = []

    class Counting(torch.nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    torch.manual_seed(0)
    net = torch.nn.Sequential(Counting(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)

    def grads():
        net.zero_grad()
        net(x).square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    calls.clear()
    with gradient_checkpointing([net[0], net[2]]):
        assert "forward" in net[0].__dict__
        checkpointed = grads()
    assert len(calls) == 2  # the first block ran again in backward: it was checkpointed
    assert all(torch.allclose(a, b) for a, b in zip(plain, checkpointed))
    assert "forward" not in net[0].__dict__ and "forward" not in net[2].__dict__
