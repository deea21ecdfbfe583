"""The one run skeleton (productscene/train/run.py) every trainer shares: its options are checked
before any work, the engine runs inside the host's training session (and inside what the recipe
binds there), a cancel keeps the last completed step and comes back as a cancelled run whose
session work (``keep``) was skipped, a resume finishes like an uninterrupted run, and the summary
carries what every written file says."""
from __future__ import annotations

import contextlib

import pytest
import torch

from productscene.errors import ProductSceneError
from productscene.train.engine import Phase, read_checkpoint_info
from productscene.train.recipes.categories import CategoryConfig, train_category_library
from productscene.train.recipes.concepts import ConceptConfig, train_concepts
from productscene.train.run import RunOptions, loss_span, run_recipe
from tests.test_train_engine import ToyRecipe

PHASES = [Phase("a", 4, {"a": 0.05}), Phase("both", 4, {"a": 0.01, "b": 0.02})]


class Host:
    """Records the training sessions a run opens."""
    device = torch.device("cpu")

    def __init__(self):
        self.sessions, self.inside = [], False

    @contextlib.contextmanager
    def session(self, lora=None, latent_shape=None, gradient_checkpoint=False):
        self.sessions.append((lora, latent_shape, gradient_checkpoint))
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


class Untouchable:
    """A host a run must not touch: the run is refused before any work."""

    def __getattr__(self, name):
        raise AssertionError(f"the run used the host ({name}) before refusing its options")


class WatchedRecipe(ToyRecipe):
    """Notes, per step, whether it ran in the host's session and inside what it binds there."""

    def __init__(self, host):
        super().__init__()
        self.host, self.bound, self.steps_in, self.kept = host, False, [], 0

    @contextlib.contextmanager
    def bind(self):
        assert self.host.inside
        self.bound = True
        try:
            yield
        finally:
            self.bound = False

    def keep(self):
        assert self.host.inside and self.bound
        self.kept += 1
        return {"a": self.a.detach().clone()}

    def loss(self, batch, step):
        self.steps_in.append((self.host.inside, self.bound))
        return super().loss(batch, step)


def test_the_engine_runs_in_the_session_a_cancel_skips_keep_and_a_resume_matches(tmp_path):
    host = Host()
    whole = WatchedRecipe(host)
    done = run_recipe(host, whole, PHASES, RunOptions(seed=5), name="toy", latent_shape=(2, 4, 8, 8),
                      lora="the lora", bound=whole.bind, keep=whole.keep)
    assert not done.cancelled and done.result.steps_done == 8
    assert host.sessions == [("the lora", (2, 4, 8, 8), False)]
    assert whole.steps_in == [(True, True)] * 8 and not whole.bound and whole.kept == 1
    assert torch.equal(done.kept["a"], whole.a.detach())
    assert done.graph.shape == (1, 256, 512, 3)

    state = tmp_path / "state.safetensors"
    calls = []
    cut_recipe = WatchedRecipe(host)
    cut = run_recipe(host, cut_recipe, PHASES, RunOptions(seed=5, checkpoint_path=state, gradient_checkpoint=True,
                                                          should_stop=lambda: len(calls.append(1) or calls) > 3),
                     name="toy", latent_shape=(2, 4, 8, 8), bound=cut_recipe.bind, keep=cut_recipe.keep)
    assert cut.cancelled and cut.kept is None and cut_recipe.kept == 0
    assert host.sessions[-1] == (None, (2, 4, 8, 8), True)
    assert read_checkpoint_info(state)["step"] == 3

    resumed_recipe = WatchedRecipe(host)
    resumed = run_recipe(host, resumed_recipe, PHASES, RunOptions(seed=5, checkpoint_path=state, resume=True),
                         name="toy", latent_shape=(2, 4, 8, 8), bound=resumed_recipe.bind, keep=resumed_recipe.keep)
    assert resumed.result.steps_done == 8 and len(resumed_recipe.steps_in) == 5
    assert resumed.result.history == done.result.history
    assert torch.equal(resumed.kept["a"], done.kept["a"])


def test_the_summary_every_written_file_carries():
    host = Host()
    trained = run_recipe(host, ToyRecipe(), PHASES, RunOptions(seed=7), name="toy", latent_shape=(1, 4, 8, 8))
    h = trained.result.history
    summary = trained.summary("toy", 7, {"steps": 8}, images=3)
    assert summary == {"recipe": "toy", "steps": 8, "seed": 7, "images": 3, "first_loss": sum(h) / 8,
                       "final_loss": sum(h) / 8, "config": {"steps": 8}}
    assert loss_span([4.0] * 20 + [1.0] * 30) == (4.0, 1.0) and loss_span([]) == (None, None)


@pytest.mark.parametrize("fields, match", [
    ({"checkpoint_every": -1}, r"^checkpoint_every: expected 0 \(off\) or a number of steps, got -1"),
    ({"preview_every": "often"}, r"^preview_every: expected 0 \(off\) or a number of steps, got 'often'"),
    ({"autocast": "fp8"}, r"^autocast: expected auto, off, bf16 or fp16, got 'fp8'"),
    ({"resume": "/no/such/state.safetensors"}, r"^resume: checkpoint '/no/such/state.safetensors' not found"),
])
def test_bad_run_options_are_refused_before_any_work(tmp_path, fields, match):
    with pytest.raises(ProductSceneError, match=match):
        RunOptions(**fields)
    # the runs refuse them before they look at their data, outputs or host
    with pytest.raises(ProductSceneError, match=match):
        train_category_library(Untouchable(), tmp_path / "no data", tmp_path / "out.safetensors",
                               CategoryConfig(resolution=64), cache_dir=tmp_path / "cache", **fields)
    with pytest.raises(ProductSceneError, match=match):
        train_concepts(Untouchable(), torch.rand(1, 64, 64, 3), torch.ones(1, 64, 64), tmp_path / "c.safetensors",
                       ConceptConfig(resolution=64), RunOptions.of(None, {}), **fields)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out.safetensors").exists()


def test_a_misspelt_run_option_is_named_not_ignored(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument.*checkpoint_evry"):
        train_category_library(Untouchable(), tmp_path, tmp_path / "out.safetensors", CategoryConfig(resolution=64),
                               cache_dir=tmp_path / "cache", checkpoint_evry=10)
    options = RunOptions.of(RunOptions(seed=3), {"checkpoint_every": 10})
    assert (options.seed, options.checkpoint_every) == (3, 10)
