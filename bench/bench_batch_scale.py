"""The batch client at catalogue scale against simulated ComfyUI servers (devkit/sim_server.py).

    .venv/bin/python bench/bench_batch_scale.py [--servers 64] [--rows 100000] [--small 10000]
        [--exec-time 0.5] [--jitter 0.1] [--images 200] [--fault-rows 100000] [--seed 0]

The simulated servers run on one event loop in this process; the client is
``python -m productscene batch --servers-file ...`` in a child process, so its CPU time and peak RSS
are its own (``os.wait4``). Each server runs one prompt at a time, ``--exec-time`` +- ``--jitter``
seconds: their capacity is ``servers / exec-time`` rows per second.

1. clean runs of ``--small`` and ``--rows`` rows: client CPU time per row (bar <= 2 ms), peak RSS
   (bar <= 300 MB, and flat: the larger run within 10% of the smaller), throughput against the
   servers' capacity (bar >= 0.9), every row done exactly once.
2. a run of ``--fault-rows`` rows with faults: 10% of the servers killed at random moments (two of
   them restarted a little later), and at half the rows the client itself killed with SIGKILL and
   run again with --resume: every row done exactly once, only unfinished rows queued again, no
   torn or repeated line in the journal or the provenance.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from devkit.sim_server import SimFarm  # noqa: E402
from productscene.batch import JOURNAL_NAME, PROVENANCE_NAME  # noqa: E402

CATEGORIES = ("perfume", "tea", "tools", "cosmetics")


def catalogue(folder: Path, rows: int, images: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        rng = np.random.default_rng(i)
        rgba = np.zeros((32, 32, 4), np.uint8)
        rgba[..., :3] = rng.integers(0, 256, 3)
        rgba[8:24, 8:24] = [*rng.integers(0, 256, 3), 255]
        Image.fromarray(rgba, "RGBA").save(folder / f"p{i:04d}.png")
    manifest = folder / f"products-{rows}.csv"
    with open(manifest, "w") as f:
        f.write("product,category,seed,output\n")
        for i in range(rows):
            f.write(f"p{i % images:04d}.png,{CATEGORIES[i % 4]},{i},row-{i:07d}\n")
    return manifest


def lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed; SystemExit on a torn, unparsable or repeated line."""
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raise SystemExit(f"{path.name}: the last line is cut short")
    text = raw.decode().splitlines()
    if len(set(text)) != len(text):
        raise SystemExit(f"{path.name}: {len(text) - len(set(text))} lines repeated")
    try:
        return [json.loads(line) for line in text]
    except ValueError as e:
        raise SystemExit(f"{path.name}: a line is not JSON ({e})") from None


class LineCount:
    """Lines in a growing file, counted from where the last call stopped."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


class Client:
    """``python -m productscene batch`` in a child process; its CPU time and peak RSS when it ends."""

    def __init__(self, servers_file: Path, manifest: Path, out: Path, *more: str):
        args = [sys.executable, "-m", "productscene", "batch", "--servers-file", str(servers_file),
                "--manifest", str(manifest), "--out", str(out), "--quiet", *more]
        self.t0, self.started = time.perf_counter(), time.time()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def running(self) -> bool:
        return self.proc.poll() is None

    def peak_rss_mb(self) -> float:
        """The process's own peak RSS (VmHWM: counted from its exec, unlike ru_maxrss, which also
        counts the parent's memory a forked child starts with)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration, ValueError):
            return 0.0

    def wait(self) -> dict:
        peak = 0.0
        while True:       # polled until it ends (a zombie has no memory left to show)
            peak = max(peak, self.peak_rss_mb())
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.2)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = (s.read().decode() for s in (self.proc.stdout, self.proc.stderr))
        return {"code": self.proc.returncode, "wall": time.perf_counter() - self.t0,
                "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": peak,
                "stdout": stdout, "stderr": stderr}


def check_once(out: Path, rows: int) -> list[dict]:
    recs = lines(out / PROVENANCE_NAME)
    outputs = [r["output"] for r in recs]
    if len(outputs) != len(set(outputs)):
        raise SystemExit(f"{len(outputs) - len(set(outputs))} rows recorded twice")
    if set(outputs) != {f"row-{i:07d}.png" for i in range(rows)}:
        raise SystemExit(f"{rows - len(set(outputs))} rows missing")
    missing = [o for o in outputs if not (out / o).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} recorded outputs have no file, e.g. {missing[0]}")
    return recs


def clean_run(work: Path, farm_urls: Path, manifest: Path, rows: int, capacity: float) -> dict:
    out = work / f"out-{rows}"
    client = Client(farm_urls, manifest, out)
    result = client.wait()
    if result["code"] != 0:
        raise SystemExit(f"the client failed ({result['code']}):\n{result['stdout']}\n{result['stderr'][-3000:]}")
    recs = check_once(out, rows)
    first_queued = min(r["timings"]["server_start_ms"] for r in recs) / 1000
    last_end = max(r["timings"]["server_end_ms"] for r in recs) / 1000
    run = last_end - first_queued
    result.update(rows=rows, cpu_ms_per_row=1000 * result["cpu"] / rows, run_s=run,
                  throughput=rows / run, ratio=rows / run / capacity, check_s=first_queued - client.started)
    shutil.rmtree(out)
    return result


def fault_run(work: Path, farm: SimFarm, servers, urls_file: Path, manifest: Path, rows: int, rng: random.Random,
              exec_time: float) -> dict:
    out = work / "out-faults"
    provenance = out / PROVENANCE_NAME
    victims = rng.sample(servers, max(1, round(0.1 * len(servers))))
    restarted = victims[:2]
    # deaths at random moments in the first half (by rows written), restarts a little later
    kill_at = sorted(rng.uniform(0.05, 0.45) * rows for _ in victims)
    events = [(at, "kill", s) for at, s in zip(kill_at, victims)]
    events += [(at + 0.05 * rows, "restart", s) for at, s in zip(kill_at, victims) if s in restarted]
    events.sort(key=lambda e: e[0])
    client = Client(urls_file, manifest, out)
    count_lines = LineCount(provenance)
    done_at_kill = None
    log = []
    deadline = time.monotonic() + 600 + 3 * rows * exec_time / len(servers)
    while True:
        if time.monotonic() > deadline:
            client.proc.kill()
            raise SystemExit(f"the client did not reach half the rows in time ({count_lines()} done)")
        done = count_lines()
        while events and done >= events[0][0]:
            at, what, server = events.pop(0)
            (server.kill if what == "kill" else server.restart)()
            log.append((what, server.url, done))
        if done >= rows // 2 and done_at_kill is None and not any(e[1] == "restart" for e in events):
            peak = client.peak_rss_mb()       # a killed process shows none afterwards
            client.proc.send_signal(signal.SIGKILL)
            first = client.wait()
            first["rss_mb"] = max(first["rss_mb"], peak)
            done_at_kill = count_lines()
            break
        if not client.running():
            raise SystemExit(f"the client ended before it was killed:\n{client.wait()['stderr'][-3000:]}")
        time.sleep(0.05)
    first_outputs = {r["output"] for r in lines(provenance)} if provenance.stat().st_size else set()
    up = [s for s in servers if s.running]
    urls_up = work / "servers-up.txt"
    urls_up.write_text("".join(s.url + "\n" for s in up))
    second = Client(urls_up, manifest, out, "--resume").wait()
    if second["code"] != 0:
        raise SystemExit(f"the resumed client failed ({second['code']}):\n{second['stdout']}\n{second['stderr'][-3000:]}")
    recs = check_once(out, rows)
    journal = lines(out / JOURNAL_NAME)
    starts = [i for i, e in enumerate(journal) if e["event"] == "start"]
    queued_again = [e["output"] for e in journal[starts[-1]:] if e["event"] == "queued"]
    rerun = set(queued_again) & first_outputs
    restarted_urls = {s.url for s in restarted}
    back_at = {url: done for what, url, done in log if what == "restart"}
    picked_up = {url: sum(1 for r in recs[back_at[url]:done_at_kill] if r["server"] == url) for url in back_at}
    victim_urls = {s.url for s in victims}
    where = {r["output"]: r["server"] for r in recs}
    handed = len({e["output"] for e in journal if e["event"] == "queued" and e["server"] in victim_urls
                  and where[e["output"]] != e["server"]})
    result = {"rows": rows, "killed": len(victims), "restarted": len(restarted), "events": log,
              "done_at_kill": done_at_kill, "first_rss_mb": first["rss_mb"], "resume_rss_mb": second["rss_mb"],
              "resume_stdout": second["stdout"].strip().splitlines()[0], "queued_again": len(queued_again),
              "rerun_finished": len(rerun), "picked_up_after_restart": picked_up, "records": len(recs),
              "cpu_ms_per_row": 1000 * (first["cpu"] + second["cpu"]) / rows, "handed": handed,
              "by_victims": sum(1 for r in recs if r["server"] in victim_urls)}
    if rerun:
        raise SystemExit(f"{len(rerun)} rows finished before the kill were queued again")
    if any(n == 0 for n in picked_up.values()) or set(picked_up) != restarted_urls:
        print(f"note: a restarted server delivered no row before the client was killed: {picked_up}")
    shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=64)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--fault-rows", type=int, default=100_000, help="0: no fault run")
    parser.add_argument("--exec-time", type=float, default=0.5, help="seconds a simulated prompt takes")
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--images", type=int, default=200, help="distinct product images in the catalogue")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="productscene-bench-scale-"))
    farm = SimFarm()
    try:
        servers = [farm.add(exec_time=args.exec_time, jitter=args.jitter, seed=args.seed * 1000 + i)
                   for i in range(args.servers)]
        urls = work / "servers.txt"
        urls.write_text("".join(s.url + "\n" for s in servers))
        capacity = args.servers / args.exec_time
        print(f"{args.servers} simulated servers, {args.exec_time} s +- {args.jitter} s a prompt: capacity "
              f"{capacity:.1f} rows/s; {args.images} product images; {os.cpu_count()} CPUs on this machine")
        results = {}
        for rows in (args.small, args.rows):
            manifest = catalogue(work / "data", rows, args.images)
            r = results[rows] = clean_run(work, urls, manifest, rows, capacity)
            print(f"{rows} rows: client CPU {r['cpu']:.1f} s = {r['cpu_ms_per_row']:.3f} ms/row (bar <= 2), peak RSS "
                  f"{r['rss_mb']:.1f} MB (bar <= 300); check before the first prompt {r['check_s']:.1f} s; first "
                  f"prompt start to last end {r['run_s']:.1f} s = {r['throughput']:.1f} rows/s = {r['ratio']:.3f} "
                  f"x capacity (bar >= 0.9); whole command {r['wall']:.1f} s; every row once")
        small, big = results[args.small], results[args.rows]
        print(f"peak RSS {args.rows} rows / {args.small} rows = {big['rss_mb'] / small['rss_mb']:.3f} (bar <= 1.10)")
        if args.fault_rows:
            manifest = catalogue(work / "data", args.fault_rows, args.images)
            f = fault_run(work, farm, servers, urls, manifest, args.fault_rows, rng, args.exec_time)
            print(f"faults, {f['rows']} rows: {f['killed']} of {args.servers} servers killed at random moments, "
                  f"{f['restarted']} restarted: {f['events']}")
            print(f"  client SIGKILLed at {f['done_at_kill']} rows done (peak RSS {f['first_rss_mb']:.1f} MB); "
                  f"resumed: '{f['resume_stdout']}' (peak RSS {f['resume_rss_mb']:.1f} MB), {f['queued_again']} "
                  f"prompts queued by the resumed run, {f['rerun_finished']} of them for rows finished before the "
                  f"kill")
            print(f"  {f['handed']} rows queued on a killed server were handed on and done elsewhere; "
                  f"{f['by_victims']} rows were done by the killed servers (before dying or after a restart)")
            print(f"  rows delivered by restarted servers after their restart (before the kill): "
                  f"{f['picked_up_after_restart']}; {f['records']} records = every row exactly once, journal and "
                  f"provenance without a torn or repeated line; client CPU over both runs "
                  f"{f['cpu_ms_per_row']:.3f} ms/row")
    finally:
        farm.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
