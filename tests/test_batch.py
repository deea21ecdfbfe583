"""The batch client (``python -m productscene batch``) on loopback, on real ComfyUI servers (the
default random-weight, detectable SD1.5 checkpoint, 32 px cut-outs, one sampler step) and on the
simulated servers of devkit/sim_server.py: every test that takes ``servers`` runs on both, with the
same assertions (the real-server runs are host-level).

Two servers are started once for the module. Killing and restarting them is deterministic: a test
waits on what it can observe (provenance records written, a prompt in the server's queue) before
it acts, never on a sleep."""
from __future__ import annotations

import datetime
import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from productscene import graph
from productscene.batch import (JOURNAL_NAME, PROVENANCE_NAME, BatchError, Options, read_manifest,
                                read_provenance, run_batch)
from productscene.client import ComfyClient
from devkit.comfy_env import COMFYUI_DIR, REPO_ROOT

WORKFLOW = REPO_ROOT / "workflows" / "api" / "category_background.json"
CATEGORIES = ("perfume", "tea", "tools", "cosmetics")
SIZE = 32
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=[pytest.param("comfyui", marks=pytest.mark.host), "sim"])
def servers(request):
    """Two servers started side by side: real ComfyUI with the default model, or simulated."""
    if request.param == "sim":
        yield from _simulated()
        return
    from devkit.launcher import ComfyServer

    ckpt, lib = request.getfixturevalue("default_model_files")
    pair = [ComfyServer(COMFYUI_DIR, models={"checkpoints": [Path(ckpt)], "category_libraries": [Path(lib)]},
                        env=THREADS) for _ in range(2)]
    errors = []

    def start(server):
        try:
            server.start()
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield pair
    finally:
        for s in pair:
            s.stop()


def _needs_category_placeholder(prompt: dict) -> dict:
    """The simulator's stand-in for the Category Tokens node's refusal of a template without
    ``{category}``: node_errors as ComfyUI answers them."""
    return {node_id: {"class_type": node["class_type"], "errors": [{
        "message": "template has no {category} placeholder", "details": node["inputs"]["template"]}]}
        for node_id, node in prompt.items()
        if node.get("class_type") == "ProductSceneCategoryTokens" and "{category}" not in node["inputs"]["template"]}


def _simulated():
    from devkit.sim_server import SimFarm

    farm = SimFarm()
    try:
        # 0.2 s a prompt in four progress steps: slow enough for sampling progress between rows
        yield [farm.add(exec_time=0.2, progress_steps=4, validate=_needs_category_placeholder) for _ in range(2)]
    finally:
        farm.close()


def running(server):
    """The server, started again if an earlier test killed it."""
    if not server.running:
        server.restart()
    return server


def product(path: Path, i: int) -> None:
    """A 32 px cut-out that differs from every other one (colours and position from ``i``)."""
    rng = np.random.default_rng(1000 + i)
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, 3)
    x = 4 + i % 9
    # in the upper half: grown by the workflow's grow_latent_px the product still leaves background
    # in the 4x4 latent (Masked Category Attention refuses a gate that covers the whole latent)
    rgba[2:12, x:x + 14, :3] = rng.integers(0, 256, (10, 14, 3))
    rgba[2:12, x:x + 14, 3] = 255
    Image.fromarray(rgba, "RGBA").save(path)


def catalogue(folder: Path, n: int, *, start: int = 0, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["product,category,seed,output" + (",reference" if extra else "")]
    for i in range(start, start + n):
        product(folder / f"p{i:03d}.png", i)
        lines.append(f"p{i:03d}.png,{CATEGORIES[i % 4]},{i},item-{i:03d}" + (f",{extra}" if extra else ""))
    manifest = folder / "products.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def cli_args(servers, manifest, out, *more):
    args = [sys.executable, "-m", "productscene", "batch", "--manifest", str(manifest), "--out", str(out),
            "--set", "Sampler.steps=1", "--quiet"]
    for s in servers:
        args += ["--server", s.url]
    return args + [str(m) for m in more]


def cli_env():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), **THREADS)


def run_cli(servers, manifest, out, *more, timeout=600):
    return subprocess.run(cli_args(servers, manifest, out, *more), capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=REPO_ROOT)


def interrupted_run(servers, manifest, out, what, condition, act, timeout=300):
    """Start the client, wait until ``condition()`` holds (polling what the test can observe),
    then ``act(process)``; returns the client's (exit status, stdout, stderr)."""
    # SIGINT as in a terminal's foreground job (a background shell job inherits it ignored)
    proc = subprocess.Popen(cli_args(servers, manifest, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(), cwd=REPO_ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + timeout
        while not condition():
            if proc.poll() is not None:
                raise AssertionError(f"the client exited ({proc.returncode}) before {what}:\n{proc.stderr.read()}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)
        act(proc)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr


def records(out: Path) -> list[dict]:
    return read_provenance(out / PROVENANCE_NAME)


def queued_outputs(out: Path) -> list[str]:
    """The output of every prompt the client queued, from its journal (one per prompt)."""
    journal = [json.loads(line) for line in (out / JOURNAL_NAME).read_text().splitlines()]
    return [e["output"] for e in journal if e["event"] == "queued"]


def in_flight(server) -> bool:
    try:
        return bool(ComfyClient(server.url, timeout=5).queue_ids())
    except Exception:
        return False


def check_outputs(manifest: Path, out: Path, recs: list[dict]) -> None:
    """One record per row, and every output's product pixels are its own input's, bit for bit."""
    rows = [line.split(",") for line in manifest.read_text().splitlines()[1:]]
    by_output = {}
    for rec in recs:
        assert rec["output"] not in by_output, f"{rec['output']} recorded twice"
        by_output[rec["output"]] = rec
    assert sorted(by_output) == sorted(f"{r[3]}.png" for r in rows)
    for name, category, seed, output, *_ in rows:
        rec = by_output[f"{output}.png"]
        src = manifest.parent / name
        rgba = np.asarray(Image.open(src))
        result = np.asarray(Image.open(out / rec["output"]).convert("RGB"))
        inside = rgba[..., 3] == 255
        assert result.shape == rgba[..., :3].shape
        assert np.array_equal(result[inside], rgba[..., :3][inside]), f"{output}: product pixels differ from {name}"
        assert rec["product"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert rec["category"] == category and rec["seed"] == int(seed)
        assert rec["files"][0]["sha256"] == hashlib.sha256((out / rec["output"]).read_bytes()).hexdigest()
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


# ------------------------------------------------------------------------------ without a server
def test_manifest_lines_and_binding_convention(tmp_path):
    (tmp_path / "m.csv").write_text(
        'product,category,prompt,Sampler.cfg\n'
        '# a comment line\n'
        'a.png,tea,"two\nlines",5\n'
        '\n'
        'b.png,tools,,\n'
        'c.png\n')
    rows, problems = read_manifest(tmp_path / "m.csv")
    assert [r.line for r in rows] == [3, 6]
    assert rows[0].cells == {"prompt": "two\nlines", "Sampler.cfg": "5"} and rows[1].cells == {}
    assert problems == ["line 7: 1 cells, but the header has 4 columns"]

    api = json.loads(WORKFLOW.read_text())
    # every role the shipped twin offers, and where it binds
    assert graph.target(api, "product") == (graph.find_node(api, class_type="LoadImage"), "image")
    assert graph.target(api, "category")[1] == "category" and graph.target(api, "prompt")[1] == "template"
    assert graph.target(api, "seed") == (graph.find_node(api, class_type="KSampler"), "seed")
    assert graph.target(api, "output") == (graph.find_node(api, class_type="SaveImage"), "filename_prefix")
    assert graph.target(api, "negative_prompt")[1] == "text"
    assert not graph.has_role(api, "reference")
    bound = graph.bind(api, {"seed": 5, "Checkpoint.ckpt_name": "x.safetensors"})
    assert bound[graph.find_node(api, class_type="KSampler")]["inputs"]["seed"] == 5
    assert api[graph.find_node(api, class_type="KSampler")]["inputs"]["seed"] != 5   # a copy
    with pytest.raises(Exception, match="Sampler.*has no input 'nope'"):
        graph.target(api, "Sampler.nope")
    with pytest.raises(Exception, match="is fed by another node"):
        graph.bind(api, {"Sampler.model": 1})


# ------------------------------------------------------------------------------ on servers
def test_malformed_manifest_lists_every_line_and_queues_nothing(servers, tmp_path):
    a, b = (running(s) for s in servers)
    data = tmp_path / "data"
    catalogue(data, 1)
    product(data / "ok.png", 1)
    (data / "ref.png").write_bytes((data / "ok.png").read_bytes())
    (data / "bad.csv").write_text(
        "product,category,seed,output,reference\n"
        "ok.png,tea,1,first,\n"          # 2: fine
        "missing.png,tea,1,m,\n"         # 3: no such file
        "ok.png,shoes,1,s,\n"            # 4: category in no library
        "ok.png,tea,abc,x,\n"            # 5: seed not a number
        "ok.png,tea,-1,y,\n"             # 6: seed below the sampler's minimum
        "ok.png,tea,1,First,\n"          # 7: output name taken by line 2 (names are case-blind)
        "ok.png,tea,1,../up,\n"          # 8: not a plain file name
        "ok.png,tea\n"                   # 9: too few cells
        "ok.png,tea,1,r,ref.png\n"       # 10: a reference, but the workflow has no Brand reference
        "products.csv,tea,1,z,\n")       # 11: not an image
    before = [len(ComfyClient(s.url).history_all()) for s in (a, b)]
    done = run_cli([a, b], data / "bad.csv", tmp_path / "out")
    assert done.returncode == 2, done.stdout + done.stderr
    for line in range(3, 12):
        assert f"line {line}:" in done.stderr, (line, done.stderr)
    assert "line 2:" not in done.stderr
    assert "'shoes' is not in library" in done.stderr and "brand reference" in done.stderr
    assert "nothing was queued" in done.stderr
    assert [len(ComfyClient(s.url).history_all()) for s in (a, b)] == before
    for s in (a, b):
        assert not (s.base_dir / "input" / "productscene_batch").exists(), "something was uploaded"
    assert not (tmp_path / "out" / PROVENANCE_NAME).exists()


def test_fifty_rows_each_output_belongs_to_its_row(servers, tmp_path):
    a = running(servers[0])
    manifest = catalogue(tmp_path / "data", 50)
    out = tmp_path / "out"
    done = run_cli([a], manifest, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "50 rows: 50 done, 0 failed" in done.stdout
    recs = records(out)
    assert len(recs) == 50
    check_outputs(manifest, out, recs)
    # two prompts in flight: when a prompt finished, the next one was already waiting in the queue
    runs = sorted(recs, key=lambda r: r["timings"]["server_start_ms"])
    queued_ms = [datetime.datetime.fromisoformat(r["timings"]["queued_at"]).timestamp() * 1000 for r in runs]
    waiting = sum(q < prev["timings"]["server_end_ms"] for prev, q in zip(runs, queued_ms[1:]))
    assert waiting >= 0.9 * (len(runs) - 1), f"the next prompt was queued in time for only {waiting} of 49 rows"
    workflow_sha = graph.workflow_hash(json.loads(WORKFLOW.read_text()))
    client = ComfyClient(a.url)
    for rec in recs[:5]:  # the record names the server's own run of this row
        assert rec["workflow"]["sha256"] == workflow_sha and rec["server"] == a.url
        entry = client.history(rec["prompt_id"])
        span = client.execution_span(entry)
        assert span == (rec["timings"]["server_start_ms"], rec["timings"]["server_end_ms"])
        saved = [img["filename"] for out_ in entry["outputs"].values() for img in out_.get("images", [])]
        assert any(Path(rec["output"]).stem in name for name in saved), saved


def test_server_killed_and_restarted_mid_run(servers, tmp_path):
    a = running(servers[0])
    manifest = catalogue(tmp_path / "data", 14)
    out = tmp_path / "out"
    killed_at = []

    def kill_and_restart(_client):
        a.kill()
        killed_at.append(len(records(out)))
        a.restart()

    code, stdout, stderr = interrupted_run([a], manifest, out, "3 rows done and a prompt in flight",
                                           lambda: len(records(out)) >= 3 and in_flight(a), kill_and_restart)
    assert code == 0, stdout + stderr
    assert killed_at[0] < 14
    recs = records(out)
    check_outputs(manifest, out, recs)                 # none lost, none written twice
    assert "stopped answering" in stdout
    assert len(queued_outputs(out)) > 14, "no prompt was queued again after the restart"
    assert any(rec["attempts"] > 1 for rec in recs)


def test_client_killed_then_resumed_runs_only_the_unfinished_rows(servers, tmp_path):
    a = running(servers[0])
    manifest = catalogue(tmp_path / "data", 12, start=100)
    out = tmp_path / "out"
    code, _, _ = interrupted_run([a], manifest, out, "4 rows done", lambda: len(records(out)) >= 4,
                                lambda client: client.send_signal(signal.SIGKILL))
    assert code == -signal.SIGKILL
    first = {rec["output"] for rec in records(out)}
    assert 4 <= len(first) < 12

    again = run_cli([a], manifest, out)
    assert again.returncode != 0 and "--resume" in again.stderr      # no silent restart over earlier work

    done = run_cli([a], manifest, out, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(first)} of 12 rows already done" in done.stdout
    recs = records(out)
    check_outputs(manifest, out, recs)
    assert {r["output"] for r in recs[len(first):]} == {f"item-{i:03d}.png" for i in range(100, 112)} - first
    # each row was queued once over both runs: finished rows not again, and the prompts the killed
    # client had in flight were collected from the server rather than queued a second time
    queued = queued_outputs(out)
    assert sorted(queued) == sorted(set(queued)) and len(queued) == 12, queued


def test_ctrl_c_stops_with_status_130_and_says_how_to_resume(servers, tmp_path):
    a = running(servers[0])
    manifest = catalogue(tmp_path / "data", 8, start=400)
    out = tmp_path / "out"
    code, stdout, _ = interrupted_run([a], manifest, out, "1 row done", lambda: len(records(out)) >= 1,
                                      lambda client: client.send_signal(signal.SIGINT))
    assert code == 130, stdout
    assert "interrupted" in stdout and "--resume" in stdout
    assert 1 <= len(records(out)) < 8


class FlakyProxy(http.server.ThreadingHTTPServer):
    """HTTP in front of a real server that answers 503 to the first ``faults[(method, path prefix)]``
    matching requests and forwards everything else (no websocket: the client falls back to polling)."""

    def __init__(self, target: str, faults: dict):
        self.target, self.faults, self.injected = target, dict(faults), []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _relay(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy = self.server
        with proxy.lock:
            for (method, prefix), left in proxy.faults.items():
                if self.command == method and self.path.startswith(prefix) and left > 0:
                    proxy.faults[(method, prefix)] -= 1
                    proxy.injected.append((method, prefix))
                    self.send_error(503, "injected")
                    return
        if self.path.startswith("/ws"):
            self.send_error(404)
            return
        request = urllib.request.Request(proxy.target + self.path, data=body or None, method=self.command,
                                         headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                status, headers, data = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, headers, data = e.code, e.headers, e.read()
        self.send_response(status)
        self.send_header("Content-Type", headers.get("Content-Type", "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _relay


def test_transient_errors_are_retried_and_failed_rows_are_summarised(servers, tmp_path):
    a = running(servers[0])
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        product(data / f"q{i}.png", 500 + i)
    (data / "m.csv").write_text(
        "product,category,prompt,output\n"
        "q0.png,tea,,plain\n"
        'q1.png,tools,"a {category} workbench, top view",custom\n'
        "q2.png,tea,a prompt without the placeholder,broken\n")
    proxy = FlakyProxy(a.url, {("POST", "/upload/image"): 1, ("POST", "/prompt"): 2, ("GET", "/view"): 1,
                               ("GET", "/history/"): 2})
    try:
        summary = run_batch(Options(workflow=WORKFLOW, servers=[proxy.url], out=tmp_path / "out", retries=3,
                                    poll=0.2, sets={"Sampler.steps": "1"}), manifest=data / "m.csv")
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert len(proxy.injected) == 6, proxy.injected      # every fault was met, and retried past
    assert summary.exit_code == 1 and summary.done == 2
    (where, output, why), = summary.failed
    assert (where, output) == ("line 4", "broken.png")
    assert "ProductSceneCategoryTokens" in why and "{category}" in why, why
    message = summary.message()
    assert "1 failed" in message and "line 4 (broken.png)" in message and "--resume" in message
    recs = {r["output"]: r for r in records(tmp_path / "out")}
    assert sorted(recs) == ["custom.png", "plain.png"]
    sent = ComfyClient(a.url).history(recs["custom.png"]["prompt_id"])["prompt"][2]
    assert graph.target(sent, "prompt") and sent[graph.target(sent, "prompt")[0]]["inputs"]["template"] == \
        "a {category} workbench, top view"
    assert recs["custom.png"]["values"] == {"prompt": "a {category} workbench, top view"}


def test_brand_reference_binding_folder_mode_and_websocket_progress(servers, tmp_path):
    """A workflow with a 'Brand reference' input gets each row's reference uploaded and bound (here
    the reference is saved by a second SaveImage so the test can see what the server received)."""
    a = running(servers[0])
    api = json.loads(WORKFLOW.read_text())
    api["90"] = {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Brand reference"}}
    api["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": "ref"},
                 "_meta": {"title": "Reference seen"}}
    workflow = tmp_path / "with_reference.json"
    workflow.write_text(json.dumps(api))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(2):
        product(folder / f"shoe{i}.png", 200 + i)
    reference = tmp_path / "brand.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(reference)
    seen = []
    options = Options(workflow=workflow, servers=[a.url], out=tmp_path / "out", category="tea",
                      reference=reference, sets={"Sampler.steps": "2"})
    summary = run_batch(options, folder=folder, progress=seen.append)
    assert summary.exit_code == 0, summary.message()
    assert any(0 < p.running % 1 for p in seen), "no sampling progress arrived over the websocket"
    client = ComfyClient(a.url)
    for rec in records(tmp_path / "out"):
        assert rec["reference"]["sha256"] == hashlib.sha256(reference.read_bytes()).hexdigest()
        (ref_image,) = client.outputs(rec["prompt_id"], "91")
        got = np.asarray(Image.open(io.BytesIO(client.download(ref_image))).convert("RGB"))
        assert np.array_equal(got, np.asarray(Image.open(reference).convert("RGB")))

    # references for a workflow without a 'Brand reference' node: a clear error before anything runs
    with pytest.raises(BatchError, match=r"shoe0.png, shoe1.png: a brand reference is given, but workflow "
                                         r"category_background.json has no node titled 'Brand reference'"):
        run_batch(Options(workflow=WORKFLOW, servers=[a.url], out=tmp_path / "out2", category="tea",
                          reference=reference), folder=folder)


def test_two_servers_one_killed_the_other_finishes(servers, tmp_path):
    a, b = (running(s) for s in servers)
    manifest = catalogue(tmp_path / "data", 14, start=300)
    out = tmp_path / "out"
    code, stdout, stderr = interrupted_run(
        [a, b], manifest, out, "both servers delivered a row and b has a prompt in flight",
        lambda: {r["server"] for r in records(out)} == {a.url, b.url} and in_flight(b),
        lambda _client: b.kill())    # not restarted
    assert code == 0, stdout + stderr
    recs = records(out)
    check_outputs(manifest, out, recs)
    assert f"{b.url}: " in stdout and "stopped answering" in stdout
    last_b = max(i for i, r in enumerate(recs) if r["server"] == b.url)
    assert all(r["server"] == a.url for r in recs[last_b + 1:])
    assert len(recs) - last_b - 1 >= 1
