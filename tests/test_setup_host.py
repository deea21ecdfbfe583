"""scripts/setup_host.sh's venvs, as .venv/productscene-hosts lists them: each imports the versions
it pins, and a second host's venv installs only the pins that differ (av, its frontend, ...) and
reads torch and the rest from .venv, so torch's CUDA build is on the disk once (BENCHMARKS.md)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from devkit.comfy_env import REPO_ROOT as ROOT

SHARED = ("torch", "numpy", "pillow", "safetensors")   # pinned once, in requirements-dev.txt

REPORT = """
import json, sys, sysconfig, torch
from importlib import metadata
print(json.dumps({"torch": torch.__file__, "purelib": sysconfig.get_paths()["purelib"],
                  "dists": {n: [metadata.version(n), str(metadata.distribution(n).locate_file(""))]
                            for n in sys.argv[1:]}}))
"""


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return out


def report(python: str, names) -> dict:
    done = subprocess.run([python, "-c", REPORT, *names], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_each_host_venv_imports_its_pins_and_a_second_one_reads_torch_from_the_first():
    hosts = [line.split("\t") for line in (ROOT / ".venv" / "productscene-hosts").read_text().splitlines()]
    dev = pins(ROOT / "requirements-dev.txt")
    first = None
    for i, (version, python, _tree) in enumerate(hosts):
        pinned = ROOT / f"requirements-comfyui-{'.'.join(version.split('.')[:2])}.txt"
        own = dev if i == 0 else pins(pinned) if pinned.exists() else {}   # else the tree's own, unpinned
        mine = [n for n in ("av", "comfyui-frontend-package") if n in own]
        got = report(python, [*SHARED, *mine])
        purelib = Path(got["purelib"]).resolve()
        for name in [*SHARED, *mine]:
            have, where = got["dists"][name]
            assert have.split("+")[0] == (own if name in mine else dev)[name], f"ComfyUI {version}: {name} {have}"
            home = first if i and name in SHARED else purelib
            assert Path(where).resolve() == home, f"ComfyUI {version}: {name} from {where}, not {home}"
        if i == 0:
            first = purelib
        else:
            assert Path(got["torch"]).resolve().is_relative_to(first), got["torch"]
            assert not (purelib / "torch").exists(), f"{purelib} holds a torch of its own"
