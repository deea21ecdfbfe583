"""The command-line trainers under PyTorch's ``torchrun`` on the CPU (gloo): two ranks with batch b
each train what one process with batch 2b trains (categories, personality, concepts), a SIGTERM stops both after the same step and one
process resumes to the same end, a killed rank stops the other with an error naming it, the
latent cache encodes every image once across ranks, and the README's one-node and two-node
commands run (two nodes simulated on loopback with two ``torchrun`` invocations).

Float tolerance: the ranks' gradients are summed in a different order than one process sums its
batch, so the trained tensors match within float32 rounding, which AdamW's division by sqrt(v)
turns into a visible step where a gradient entry is near zero (an update there is lr x the sign of
rounding noise). Measured after 3-4 steps: mean absolute difference over every trainable element
~1e-6, largest ~5e-5 (categories, identifier lr 5e-3) and ~9e-5 (personality, lr 1e-3); concepts
(token lr 5e-3, LoRA lr 1e-3, 3 steps): mean ~2e-9, largest ~1.3e-5. The tests
allow a mean of MEAN_TOL = 1e-5 (1% of one step at lr 1e-3) and a largest of MAX_TOL = 5e-4, and
show the tolerance tells runs apart: a run with other data or more steps is over 10 x MEAN_TOL off.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from devkit import default_model
from devkit.comfy_env import COMFYUI_DIR, REPO_ROOT
from productscene.library import TokenLibrary
from productscene.personality import PersonalityAdapter
from productscene.train.engine import read_checkpoint_info
from tests.support.cli_progress import read_until_step

MEAN_TOL, MAX_TOL = 1e-5, 5e-4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` of this interpreter


def _env(**extra):
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_DIR), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_launchers() -> tuple[list[str], list[list[str]]]:
    """The README's torchrun launchers (everything before ``-m productscene``): the one-node
    command's, and the two-node commands' (node rank 0, then 1)."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### More than one GPU / machine", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(command)
            if tokens and os.path.basename(tokens[0]) == "torchrun":
                commands.append(tokens)
    assert len(commands) == 3, commands
    launchers = []
    for tokens in commands:
        at = tokens.index("-m")
        assert tokens[at + 1:at + 3] == ["productscene", "train-categories"], tokens
        launchers.append(tokens[1:at])
    return launchers[0], launchers[1:]


def _set(tokens: list[str], flag: str, value) -> list[str]:
    out = list(tokens)
    out[out.index(flag) + 1] = str(value)
    return out


def one_node(ranks: int) -> list[str]:
    launcher, _ = readme_launchers()
    return TORCHRUN + _set(launcher, "--nproc-per-node", ranks)


def two_nodes(port: int) -> list[list[str]]:
    _, launchers = readme_launchers()
    out = []
    for node, launcher in enumerate(launchers):
        assert launcher[launcher.index("--node-rank") + 1] == str(node)
        launcher = _set(_set(launcher, "--nproc-per-node", 1), "--rdzv-endpoint", f"127.0.0.1:{port}")
        out.append(TORCHRUN + launcher)
    return out


def cli(*args, launcher=(), timeout=1200):
    command = list(launcher) + ["-m", "productscene"] if launcher else [sys.executable, "-m", "productscene"]
    proc = subprocess.Popen(command + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=REPO_ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's ranks too
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli_two_nodes(*args, timeout=1200):
    port = _free_port()
    procs = [subprocess.Popen(node + ["-m", "productscene"] + [str(a) for a in args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO_ROOT, start_new_session=True)
             for node in two_nodes(port)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        raise
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.fixture
def catalogue(tmp_path):
    root = tmp_path / "catalogue"
    for category, colour in (("perfume", (230, 120, 150)), ("tools", (90, 70, 50))):
        (root / category).mkdir(parents=True)
        for i in range(3):
            rgba = np.zeros((64, 64, 4), np.uint8)
            rgba[..., :3] = colour
            rgba[12:50, 8 + 6 * i:40] = (200, 200, 200, 255)
            Image.fromarray(rgba, "RGBA").save(root / category / f"{i}.png")
    return root


def _categories(data, checkpoint, out, tmp_path, steps, batch):
    return ["train-categories", "--data", data, "--checkpoint", checkpoint, "--out", out, "--steps", steps,
            "--resolution", 64, "--batch-size", batch, "--rank", 2, "--cpu", "--cache-dir", tmp_path / "cache",
            "--checkpoint-every", 1]


def _params(state) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(state)).items() if k.startswith("param.")}


def _gap(a: dict, b: dict) -> float:
    """The mean absolute difference over every element of the trainables (and: the largest is
    within MAX_TOL when the mean is within MEAN_TOL)."""
    assert set(a) == set(b)
    diff = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in sorted(a)])
    if diff.mean() <= MEAN_TOL:
        assert diff.max() <= MAX_TOL, float(diff.max())
    return float(diff.mean())


def _state(out) -> str:
    return os.path.splitext(str(out))[0] + ".checkpoint.safetensors"


def test_two_ranks_train_what_one_process_trains_with_the_total_batch_and_sigterm_resumes_on_one(
        catalogue, tmp_path, default_model_files):
    """Category recipe. Two nodes (the README's two-node commands on loopback, one rank each, batch
    1) against one process with batch 2, same seed: the same identifiers and LoRA after 4 steps.
    Then the README's one-node command with 2 ranks, SIGTERM to torchrun after step 1: one training
    state at the step both ranks stopped after; resumed in one process with batch 2 it ends where
    the uninterrupted one-process run ends."""
    checkpoint, steps = default_model_files[0], 4
    single = tmp_path / "single.safetensors"
    done = cli(*_categories(catalogue, checkpoint, single, tmp_path, steps, 2))
    assert done.returncode == 0, done.stderr[-3000:]

    pair = tmp_path / "pair.safetensors"
    nodes = cli_two_nodes(*_categories(catalogue, checkpoint, pair, tmp_path, steps, 1))
    for code, out, err in nodes:
        assert code == 0, err[-3000:]
    assert "training on 2 ranks (gloo): batch 1 per rank, 2 per step" in nodes[0][2], nodes[0][2][-2000:]
    assert f"wrote {pair}" in nodes[0][1] and "wrote" not in nodes[1][1]  # rank 0 writes and says so
    library = TokenLibrary.open(pair)
    assert library.names == ["perfume", "tools"] and library.has_lora
    summary = library.training
    assert summary["ranks"] == 2 and summary["total_batch"] == 2 and summary["config"]["batch_size"] == 1
    assert TokenLibrary.open(single).training["ranks"] == 1
    one, two = _params(_state(single)), _params(_state(pair))
    assert _gap(one, two) <= MEAN_TOL
    assert read_checkpoint_info(_state(pair))["step"] == steps

    # SIGTERM to a 2-rank run (the README's one-node command) after step 1
    cancelled = tmp_path / "cancelled.safetensors"
    args = _categories(catalogue, checkpoint, cancelled, tmp_path, 12, 1)
    proc = subprocess.Popen(one_node(2) + ["-m", "productscene"] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(PRODUCTSCENE_PROGRESS="1"),
                            cwd=REPO_ROOT, start_new_session=True)
    seen = _wait_for_step(proc, 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    err = seen + err.decode(errors="replace")
    info = read_checkpoint_info(_state(cancelled))
    stopped = info["step"]
    assert 1 <= stopped < 12 and len(info["history"]) == stopped, info
    assert f"step {stopped} of 12 (the last completed step) is saved" in err, err[-3000:]
    assert err.count("(the last completed step) is saved") == 1  # rank 0 alone says it (and saved it)
    # no traceback from the trainer (torchrun prints its own for the signal it got)
    assert not re.search(r'File "[^"]*/productscene(_cli)?/', err), err[-3000:]
    assert not cancelled.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "cancelled" in p.name) == ["cancelled.checkpoint.safetensors"]

    # ... resumed in one process with the total batch, it ends where one uninterrupted process ends
    resumed = cli(*_categories(catalogue, checkpoint, cancelled, tmp_path, 12, 2), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight.safetensors"
    done = cli(*_categories(catalogue, checkpoint, straight, tmp_path, 12, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    end, ref = _params(_state(cancelled)), _params(_state(straight))
    assert read_checkpoint_info(_state(cancelled))["step"] == 12
    assert _gap(end, ref) <= MEAN_TOL
    assert _gap(one, ref) > 10 * MEAN_TOL  # 4 steps against 12: the tolerance tells runs apart


def _wait_for_step(proc, min_step: int) -> str:
    reached, seen = read_until_step(proc, min_step)
    if not reached:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(seen.decode(errors="replace")[-3000:])
    return seen.decode(errors="replace")


@pytest.fixture(scope="module")
def clip_vision_file(default_model_files):
    cv, _adapter = default_model.ensure_reference_defaults(default_model_files[0], log=lambda *_: None)
    return cv


def test_two_ranks_train_the_personality_adapter_one_process_trains_with_the_total_batch(
        catalogue, tmp_path, default_model_files, clip_vision_file):
    """Personality recipe: 2 ranks with batch 1 (the README's one-node command) against one process
    with batch 2: the same adapter after 3 steps (augmentation, noise and timesteps included)."""
    def args(out, batch):
        return ["train-personality", "--data", catalogue, "--checkpoint", default_model_files[0],
                "--clip-vision", clip_vision_file, "--out", out, "--resolution", 64, "--steps", 3,
                "--batch-size", batch, "--tokens", 4, "--lr", 1e-3, "--cpu", "--cache-dir", tmp_path / "cache"]
    single, pair = tmp_path / "single.safetensors", tmp_path / "pair.safetensors"
    done = cli(*args(single, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    two = cli(*args(pair, 1), launcher=one_node(2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1 and f"wrote {pair}" in two.stdout
    assert PersonalityAdapter.load(pair).training_summary["total_batch"] == 2
    one, both = _params(_state(single)), _params(_state(pair))
    assert _gap(one, both) <= MEAN_TOL
    # ranks that did not split the global batch (each training on its own first row) would end where
    # one process with batch 1 ends: far outside the tolerance
    alone = tmp_path / "alone.safetensors"
    done = cli(*args(alone, 1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _gap(one, _params(_state(alone))) > 10 * MEAN_TOL


@pytest.fixture
def scene(tmp_path):
    """One 64 px image with two coloured squares and their masks (white = the concept)."""
    img = np.full((64, 64, 3), 128, np.uint8)
    masks = []
    for i, (box, colour) in enumerate((((8, 32, 8, 32), (220, 30, 30)), ((36, 60, 30, 58), (30, 30, 220)))):
        y0, y1, x0, x1 = box
        img[y0:y1, x0:x1] = colour
        m = np.zeros((64, 64), np.uint8)
        m[y0:y1, x0:x1] = 255
        Image.fromarray(m).save(tmp_path / f"mask{i}.png")
        masks.append(tmp_path / f"mask{i}.png")
    Image.fromarray(img).save(tmp_path / "scene.png")
    return tmp_path / "scene.png", masks


def test_two_ranks_train_the_concepts_one_process_trains_with_the_total_batch(scene, tmp_path, default_model_files):
    """Break-A-Scene: 2 ranks with batch 1 (the README's one-node command) against one process with
    batch 2, same seed: the same concept tokens and LoRA after 1 phase-1 step and 2 phase-2 steps
    (concept subsets, flips, noise and timesteps drawn alike; tolerance MEAN_TOL / MAX_TOL as above;
    learning rates raised 10x so 3 steps move the tokens and LoRA well beyond it: one process with
    batch 1 ends 1.3e-3 away, over 100 x MEAN_TOL). Rank 0 alone writes, and the files say 2 ranks of
    batch 1 made a total batch of 2."""
    image, masks = scene

    def args(out, batch):
        return ["train-concepts", "--checkpoint", default_model_files[0], "--image", image, "--mask", masks[0],
                "--mask", masks[1], "--names", "red,blue", "--out", out, "--phase1-steps", 1, "--phase2-steps", 2,
                "--resolution", 64, "--batch-size", batch, "--lr-phase1", 5e-3, "--lr-phase2", 1e-3, "--cpu"]
    single, pair = tmp_path / "single.safetensors", tmp_path / "pair.safetensors"
    done = cli(*args(single, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    two = cli(*args(pair, 1), launcher=one_node(2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "training on 2 ranks (gloo): batch 1 per rank, 2 per step" in two.stderr, two.stderr[-2000:]
    assert two.stdout.count("wrote") == 1 and f"wrote {pair}" in two.stdout
    summary = TokenLibrary.open(pair).training
    assert summary["ranks"] == 2 and summary["total_batch"] == 2 and summary["config"]["batch_size"] == 1
    assert TokenLibrary.open(single).training["total_batch"] == 2
    one, both = _params(_state(single)), _params(_state(pair))
    assert any("lora" in k for k in one) and any("lora" not in k for k in one), sorted(one)
    assert _gap(one, both) <= MEAN_TOL
    # the written files too: the token vectors and the LoRA file
    a, b = TokenLibrary.open(single), TokenLibrary.open(pair)
    assert _gap({n: a.vectors(n)["clip_l"] for n in a.names}, {n: b.vectors(n)["clip_l"] for n in b.names}) <= MEAN_TOL
    lora_a, lora_b = (load_file(str(tmp_path / f"{s}.lora.safetensors")) for s in ("single", "pair"))
    assert _gap(lora_a, lora_b) <= MEAN_TOL
    # ranks that did not split the global batch (each training on its own first row) would end where
    # one process with batch 1 ends: far outside the tolerance
    alone = tmp_path / "alone.safetensors"
    done = cli(*args(alone, 1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _gap(one, _params(_state(alone))) > 10 * MEAN_TOL


def _rank_pids(parent: int) -> dict[int, int]:
    """``{rank: pid}`` of the workers torchrun (process ``parent``) started."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for entry in env:
            if entry.startswith(b"RANK="):
                out[int(entry[5:])] = int(pid)
    return out


def test_a_killed_rank_stops_the_other_with_an_error_naming_it_and_a_restart_resumes(
        catalogue, tmp_path, default_model_files):
    """Rank 1 SIGKILLed after step 2: rank 0 stops at once with an error naming rank 1 (no wait for
    the collective timeout), and with torchrun's --max-restarts 1 the restarted job resumes from the
    intact training state by itself and finishes."""
    out, steps = tmp_path / "lost.safetensors", 12
    args = _categories(catalogue, default_model_files[0], out, tmp_path, steps, 1)
    launcher = one_node(2)
    launcher = launcher[:len(TORCHRUN)] + ["--max-restarts", "1"] + launcher[len(TORCHRUN):]
    proc = subprocess.Popen(launcher + ["-m", "productscene"] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(PRODUCTSCENE_PROGRESS="1"),
                            cwd=REPO_ROOT, start_new_session=True)
    seen = _wait_for_step(proc, 2)
    ranks = _rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    try:
        stdout, err = proc.communicate(timeout=400)  # bounded: no rank waits for the lost one
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    err = seen + err.decode(errors="replace")
    assert "error: distributed: rank 1 of 2 was lost" in err, err[-3000:]
    resumed = re.search(r"torchrun restarted this job: resuming from step (\d+) of 12", err)
    assert resumed and 2 <= int(resumed.group(1)) < steps, err[-3000:]  # the state was intact
    assert proc.returncode == 0 and f"wrote {out}" in stdout.decode(), err[-3000:]
    info = read_checkpoint_info(_state(out))
    assert info["step"] == steps and len(info["history"]) == steps


WARM = textwrap.dedent("""
    import json, os, sys
    import torch
    from productscene.train import distributed
    from productscene.train.datasets import LatentCache, open_dataset
    from productscene.train.run import warm_latents
    world = distributed.init(cpu=True)
    ds = open_dataset(sys.argv[1])
    encoded = []
    def encode(images):
        encoded.append(1)
        return torch.zeros(images.shape[0], 4, images.shape[1] // 8, images.shape[2] // 8)
    cache = LatentCache(sys.argv[2], ds, encode, 64, namespace="counting")
    before = {i for i in range(len(ds)) if os.path.isfile(cache.path(i))}
    assert warm_latents(cache, None, None, world)
    mine = [ds[i].image for i in range(len(ds)) if i in world.shard(len(ds)) and i not in before]
    every = all(os.path.isfile(cache.path(i)) for i in range(len(ds)))
    with open(os.path.join(sys.argv[3], f"rank{world.rank}.json"), "w") as fh:
        json.dump({"vae_calls": len(encoded), "mine": mine, "every_file_there": every}, fh)
""")


def test_the_latent_cache_is_filled_once_across_ranks(catalogue, tmp_path):
    """Two ranks warm one cache folder: the VAE runs once per image in all (each rank its shard), and
    after the meeting every rank sees every latent."""
    script = tmp_path / "warm.py"
    script.write_text(WARM)
    report = tmp_path / "report"
    report.mkdir()
    done = subprocess.run(TORCHRUN + ["--standalone", "--nproc-per-node", "2", str(script), str(catalogue),
                                      str(tmp_path / "cache"), str(report)],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    images = sorted(str(p) for p in catalogue.rglob("*.png"))
    assert sum(r["vae_calls"] for r in ranks) == len(images) == 6
    assert all(r["vae_calls"] == 3 for r in ranks)  # the work is shared
    assert sorted(ranks[0]["mine"] + ranks[1]["mine"]) == images  # each image by one rank only
    assert all(r["every_file_there"] for r in ranks)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6


TOY = textwrap.dedent("""
    import json, sys
    import torch
    from productscene.train import distributed
    from productscene.train.engine import Phase, Trainer
    from productscene.train.losses import background_weights, weighted_mse
    from productscene.train.recipes.categories import MemorySource, draw_batch

    class Toy:
        # one [4,2,2] tensor trained on a weighted MSE whose product masks differ per sample, so the
        # global normaliser matters
        def __init__(self, batch):
            g = torch.Generator().manual_seed(3)
            masks = (torch.rand(8, 2, 2, generator=g) > 0.5).float()
            self.source = MemorySource(torch.randn(8, 4, 2, 2, generator=g), masks, ["a"] * 8)
            self.w = torch.nn.Parameter(torch.zeros(4, 2, 2))
            self.b = batch

        def parameter_groups(self):
            return {"w": [self.w]}

        def batch(self, step, generator):
            return draw_batch(self.source, self.b, (0, 100), generator)

        def loss(self, batch, step):
            pred = batch["latents"] * self.w + batch["timesteps"].float().view(-1, 1, 1, 1) * 0.01
            weights = background_weights(batch["masks"], (2, 2), 1.0, 0.1)
            return weighted_mse(pred, batch["noise"], weights), {}

    def train(world, batch, stop_rank=None, stop_at=None):
        toy = Toy(batch)
        trainer = Trainer(toy, [Phase("w", 6, {"w": 0.05})], seed=1, world=world,
                          should_stop=lambda: world.rank == stop_rank and trainer.step >= stop_at)
        result = trainer.run()
        return result, toy.w.detach().clone()

    if __name__ == "__main__":
        world = distributed.init(cpu=True)
        result, w = train(world, 2, stop_rank=1, stop_at=3)
        from safetensors.torch import save_file
        save_file({"w": w.contiguous()}, f"{sys.argv[1]}/rank{world.rank}.safetensors")
        with open(f"{sys.argv[1]}/rank{world.rank}.json", "w") as f:
            json.dump({"steps": result.steps_done, "cancelled": result.cancelled, "history": result.history}, f)
""")


def test_the_engine_on_two_ranks_matches_one_process_and_a_stop_on_one_rank_stops_both(tmp_path):
    """The engine alone (no ComfyUI): 2 gloo ranks with batch 2 train a toy weighted-MSE recipe; rank
    1 alone asks to stop during step 4: both ranks stop after step 4 with bit-identical trainables,
    which match one process with batch 4 after 4 steps (float32 tolerance 1e-6) and differ from one
    process with batch 2."""
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    done = subprocess.run(TORCHRUN + ["--standalone", "--nproc-per-node", "2", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [dict(json.loads((tmp_path / f"rank{r}.json").read_text()),
                  w=load_file(tmp_path / f"rank{r}.safetensors")["w"]) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [4, 4] and all(r["cancelled"] for r in ranks)
    assert torch.equal(ranks[0]["w"], ranks[1]["w"]) and ranks[0]["history"] == ranks[1]["history"]

    toy = {"__name__": "toy_engine"}  # the same source in this process (TOY itself, not the file)
    exec(compile(TOY, "toy_engine", "exec"), toy)
    toy = type("Toy", (), {"train": staticmethod(toy["train"])})
    from productscene.train import distributed
    one, w_one = toy.train(distributed.SINGLE, 4, stop_rank=0, stop_at=4)
    assert one.steps_done == 4
    assert float((w_one - ranks[0]["w"]).abs().max()) <= 1e-6
    assert one.history == pytest.approx(ranks[0]["history"], abs=1e-6)
    _, w_half = toy.train(distributed.SINGLE, 2, stop_rank=0, stop_at=4)
    assert float((w_half - ranks[0]["w"]).abs().max()) > 1e-3  # the tolerance tells batches apart
