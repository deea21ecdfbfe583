"""The batch client on simulated ComfyUI servers (devkit/sim_server.py): the websocket's Close frame,
an IPv6 loopback server, the provenance's fidelity figure, and a catalogue of 2,000 rows over four
servers with servers killed and restarted and the client itself killed with SIGKILL and resumed.

The faults are set off by what the test observes (provenance records written), never by a sleep."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devkit.sim_server import SimFarm
from productscene.batch import JOURNAL_NAME, PROVENANCE_NAME, Options, read_provenance, run_batch
from productscene.client import ComfyClient
from productscene.errors import ProductSceneError

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = REPO_ROOT / "workflows" / "api" / "category_background.json"
CATEGORIES = ("perfume", "tea", "tools", "cosmetics")


@pytest.fixture
def farm():
    farm = SimFarm()
    yield farm
    farm.close()


def cutout(path: Path, i: int, alpha: bool = True) -> None:
    rng = np.random.default_rng(i)
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, 3)
    rgba[3:3 + 8 + i % 5, 4:18, :3] = rng.integers(0, 256, (8 + i % 5, 14, 3))
    rgba[3:3 + 8 + i % 5, 4:18, 3] = 255
    rgba[2, 4:18, 3] = 128                    # an edge pixel: neither product nor background
    Image.fromarray(rgba if alpha else rgba[..., :3]).save(path)


def catalogue(folder: Path, rows: int, images: int = 20) -> Path:
    """``rows`` rows over ``images`` product images (a catalogue names the same image on many rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        cutout(folder / f"p{i}.png", i)
    lines = ["product,category,seed,output"] + [f"p{i % images}.png,{CATEGORIES[i % 4]},{i},row-{i:05d}"
                                                for i in range(rows)]
    (folder / "products.csv").write_text("\n".join(lines) + "\n")
    return folder / "products.csv"


def options(servers, out: Path, **kw) -> Options:
    return Options(workflow=WORKFLOW, servers=[s.url for s in servers], out=out, **kw)


def test_websocket_ends_with_a_close_frame_the_server_sees(farm, tmp_path):
    server = farm.add(exec_time=0.01)
    summary = run_batch(options([server], tmp_path / "out"), manifest=catalogue(tmp_path / "data", 3, 3))
    assert summary.exit_code == 0, summary.message()
    # the run's one listener said goodbye with 1000 (normal closure), not by dropping the connection
    assert server.close_codes == [1000]

    ws = ComfyClient(server.url).websocket()
    assert json.loads(ws.recv(timeout=10))["type"] == "status"
    ws.close()
    deadline = time.monotonic() + 10
    while len(server.close_codes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.close_codes == [1000, 1000]


def _ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.fail(f"this machine has no IPv6 loopback (binding [::1] failed: {e}); the IPv6 test needs one")


def test_upload_body_reads_as_aiohttp_formdata_would(farm, tmp_path):
    """The upload's multipart body is built as one bytes object (one socket write, not a dozen); the
    server must read it exactly as the FormData body it replaced: the same name (quoted as FormData
    quotes it), subfolder and bytes, for a name with spaces, quotes, non-ASCII and a boundary-like
    payload."""
    import aiohttp

    server = farm.add(exec_time=0.0)
    data = b"\x89PNG\r\n--not-a-boundary\r\n" + bytes(range(256))
    odd = 'caf\u00e9 "shoe" (1)%20.png'
    ours = ComfyClient(server.url).upload_image(data, odd, subfolder="ours/deep")

    async def formdata():
        form = aiohttp.FormData()
        for k, v in (("type", "input"), ("subfolder", "theirs/deep"), ("overwrite", "true")):
            form.add_field(k, v)
        form.add_field("image", data, filename=odd, content_type="application/octet-stream")
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/upload/image", data=form) as r:
                return await r.json()

    theirs = farm.call(formdata())
    assert ours["name"] == theirs["name"] and ours["subfolder"] == "ours/deep"
    assert server.uploads[f"ours/deep/{ours['name']}"] == data == server.uploads[f"theirs/deep/{theirs['name']}"]


def test_ipv6_loopback_server(farm, tmp_path):
    _ipv6_loopback()
    server = farm.add(host="::1", exec_time=0.01)
    assert server.url.startswith("http://[::1]:")
    seen = []
    summary = run_batch(options([server], tmp_path / "out"), manifest=catalogue(tmp_path / "data", 4, 4),
                        progress=seen.append)
    assert summary.exit_code == 0, summary.message()
    recs = read_provenance(tmp_path / "out" / PROVENANCE_NAME)
    assert sorted(r["output"] for r in recs) == [f"row-{i:05d}.png" for i in range(4)]
    assert {r["server"] for r in recs} == {server.url}
    # the websocket reached the server with a Host header that names the IPv6 host in brackets
    assert server.ws_hosts and set(server.ws_hosts) == {f"[::1]:{server.port}"}
    assert server.close_codes == [1000]


def test_provenance_carries_the_product_fidelity(farm, tmp_path):
    """Each record says how many product pixels (alpha 255) came back unchanged out of how many:
    all of them from a faithful server, all but the damaged ones from a careless one, and no figure
    for a product without alpha."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        cutout(data / f"c{i}.png", i)
    cutout(data / "flat.png", 9, alpha=False)
    (data / "m.csv").write_text("product,category,output\nc0.png,tea,a\nc1.png,tea,b\nc2.png,tea,c\nflat.png,tea,d\n")
    product_pixels = {f"{o}.png": int((np.asarray(Image.open(data / f"c{i}.png"))[..., 3] == 255).sum())
                      for i, o in enumerate("abc")}
    for damage, out in ((0, tmp_path / "faithful"), (5, tmp_path / "careless")):
        server = farm.add(exec_time=0.01, damage=damage)
        summary = run_batch(options([server], out), manifest=data / "m.csv")
        assert summary.exit_code == 0, summary.message()
        recs = {r["output"]: r for r in read_provenance(out / PROVENANCE_NAME)}
        assert recs["d.png"]["fidelity"] is None
        for name, total in product_pixels.items():
            fidelity = recs[name]["fidelity"]
            assert fidelity["product_pixels"] == total
            assert fidelity["product_pixels_unchanged"] == total - damage
            # the same count from the files themselves
            src = np.asarray(Image.open(data / f"c{'abc'.index(name[0])}.png"))
            got = np.asarray(Image.open(out / name).convert("RGB"))
            inside = src[..., 3] == 255
            assert int((got == src[..., :3]).all(-1)[inside].sum()) == fidelity["product_pixels_unchanged"]


def test_a_dead_server_is_refused_before_anything_is_queued(farm, tmp_path):
    """A server that does not answer (killed for good before a --resume) stops the run before any row
    is queued, with the URL and what to do; without it the same job runs on the others."""
    live = farm.add(exec_time=0.001)
    dead = farm.add(exec_time=0.001)
    dead.kill()
    manifest = catalogue(tmp_path / "data", 8, images=2)
    out = tmp_path / "out"
    with pytest.raises(ProductSceneError) as e:
        run_batch(Options(workflow=WORKFLOW, servers=[live.url, dead.url], out=out), manifest=manifest)
    assert dead.url in str(e.value) and "leave it out of --server/--servers-file" in str(e.value)
    assert live.url not in str(e.value) and live.executed == 0
    assert not (out / JOURNAL_NAME).exists() and not (out / PROVENANCE_NAME).exists()
    summary = run_batch(Options(workflow=WORKFLOW, servers=[live.url], out=out), manifest=manifest)
    assert summary.done == 8 and live.executed == 8


def _lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed; fails on a torn, unparsable or repeated line."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), f"{path.name}: the last line is cut short"
    text = raw.decode().splitlines()
    assert len(set(text)) == len(text), f"{path.name}: a line is repeated"
    return [json.loads(line) for line in text]


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_catalogue_of_2000_rows_with_servers_and_client_killed(farm, tmp_path):
    """Four servers at a few ms a prompt. While the client runs: one server dies for good, another
    dies and comes back; at half the catalogue the client is killed with SIGKILL, then resumed.
    Every row ends up done exactly once, only unfinished rows ran again, and neither the journal
    nor the provenance has a torn or repeated line."""
    rows = 2000
    servers = [farm.add(exec_time=0.003, jitter=0.002, seed=i) for i in range(4)]
    gone, back = servers[0], servers[1]
    manifest = catalogue(tmp_path / "data", rows)
    out = tmp_path / "out"
    servers_file = tmp_path / "servers.txt"
    servers_file.write_text("".join(s.url + "\n" for s in servers))
    args = [sys.executable, "-m", "productscene", "batch", "--servers-file", str(servers_file), "--manifest",
            str(manifest), "--out", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    provenance = out / PROVENANCE_NAME
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    marks = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            done = _count_lines(provenance)
            if "gone" not in marks and done >= rows * 0.15:
                marks["gone_ms"] = time.time() * 1000    # the farm's servers stamp with this clock
                gone.kill()
                marks["gone"] = done
            if "down" not in marks and done >= rows * 0.25:
                back.kill()
                marks["down"] = done
            if "down" in marks and "back" not in marks and done >= rows * 0.3:
                back.restart()
                marks["back"] = _count_lines(provenance)
            if "back" in marks and done >= rows * 0.5 and any(
                    r["server"] == back.url for r in read_provenance(provenance)[marks["back"]:]):
                proc.send_signal(signal.SIGKILL)
                break
            assert proc.poll() is None, f"the client ended ({proc.returncode}) before it was killed: " \
                                        f"{proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"timed out; marks {marks}, {done} rows done"
            time.sleep(0.01)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = read_provenance(provenance)
    first_outputs = {r["output"] for r in first}
    assert rows * 0.5 <= len(first) < rows
    # rows it ran before dying may still be on their way to disk; none ran after (by its own clock)
    assert all(r["timings"]["server_end_ms"] <= marks["gone_ms"] for r in first if r["server"] == gone.url), \
        "the dead server kept delivering"
    assert any(r["server"] == gone.url for r in first) and marks["gone"] < len(first)

    # the resumed run names the servers that are up (a server that does not answer stops the check)
    servers_file.write_text("".join(s.url + "\n" for s in servers if s is not gone))
    again = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert f"resume: {len(first)} of {rows} rows already done" in again.stdout

    recs = _lines(provenance)
    outputs = [r["output"] for r in recs]
    assert len(outputs) == len(set(outputs)) == rows, "a row was recorded twice or not at all"
    assert set(outputs) == {f"row-{i:05d}.png" for i in range(rows)}
    for rec in recs:
        data = (out / rec["output"]).read_bytes()
        assert rec["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
        assert rec["fidelity"]["product_pixels_unchanged"] == rec["fidelity"]["product_pixels"] > 0
    journal = _lines(out / JOURNAL_NAME)
    starts = [i for i, e in enumerate(journal) if e["event"] == "start"]
    assert len(starts) == 2
    queued_again = [e["output"] for e in journal[starts[1]:] if e["event"] == "queued"]
    assert not set(queued_again) & first_outputs, "a row finished before the kill was run again"
    assert len(queued_again) <= rows - len(first)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_the_prompt_json_made_once_is_the_bound_graph_for_every_row():
    """The run splices each row's values into the workflow's JSON made once (run._PromptJSON): the
    bytes equal json.dumps of the graph bound the plain way, whatever the values hold; a linked input
    is refused as graph.bind refuses it."""
    from productscene import graph
    from productscene.batch.run import _PromptJSON

    workflow = graph.load_workflow(WORKFLOW)
    make = _PromptJSON(workflow, {})
    rows = [{"product": "productscene_batch/ab.png", "category": "perfume", "seed": 7,
             "output": "productscene_batch/x/row-1"},
            {"product": 'q"uote\\s.png', "category": "tea \u00e9\u4e2d \n", "seed": 2 ** 63,
             "output": "o", "Sampler.cfg": 6.5, "Sampler.steps": 30},
            {"seed": 0, "Sampler.cfg": 1e-7, "output": "\x00productscene-slot-0\x00"}]
    for values in rows + rows:
        assert make(values) == json.dumps(graph.bind(workflow, values)).encode()
        assert json.loads(make(values)) == graph.bind(workflow, values)
    assert len(make.made) == 3, "made once per set of bound keys"
    with pytest.raises(ProductSceneError, match="fed by another node"):
        _PromptJSON(workflow, {})({"Sampler.model": "x", "seed": 1})
