"""Start a private ComfyUI server with this pack installed (tests, demo, headless batch runs).

Host-free: no ComfyUI import, only ``subprocess`` and the standard library. ComfyUI runs in its own
process from a ComfyUI tree (e.g. ``.venv/comfyui``) with a temporary ``--base-directory`` so that
models/, input/, output/, temp/, user/ (and the settings database) and custom_nodes/ are private::

    with ComfyServer("/path/to/ComfyUI", models={"checkpoints": ["tiny.safetensors"]}) as server:
        client = server.client()            # productscene.client.ComfyClient
        client.object_info()

The pack is linked into ``custom_nodes/<pack_name>`` (default ``productscene_pack_under_test``, a
name that differs from the repo folder's, as it will for users). The server is always stopped on
exit: terminate, then kill.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from productscene.errors import ProductSceneError

PACK_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PACK_NAME = "productscene_pack_under_test"
PRIVATE_DIRS = ("models", "input", "output", "temp", "user", "custom_nodes")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _place(src: Path, dst: Path, *, copy: bool = False) -> None:
    """Put ``src`` at ``dst``: a symlink (a copy where the file system has none), or a copy when
    ``copy`` is set."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        raise ProductSceneError(f"{dst.parent.name}: two files are both named {dst.name!r}")
    if not copy:
        try:
            dst.symlink_to(src, target_is_directory=src.is_dir())
            return
        except OSError:  # file systems without symlinks
            pass
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


# CUDA (and ROCm), XPU or MPS, as torch reports them; ``bool()`` stands in for a backend torch lacks.
_GPU_CHECK = ("torch.cuda.is_available() or getattr(getattr(torch, 'xpu', None), 'is_available', bool)() "
              "or getattr(getattr(torch.backends, 'mps', None), 'is_available', bool)()")


def gpu_usable(python: str | None = None, env: dict | None = None) -> bool:
    """Whether ComfyUI started with ``python`` would find a GPU through torch. Asked in this process
    when it is that interpreter and has loaded torch already, else in a short subprocess (a few
    seconds: it imports torch); False when torch cannot be asked."""
    python = python or sys.executable
    torch = sys.modules.get("torch")
    if torch is not None and os.path.abspath(python) == os.path.abspath(sys.executable):
        return bool(eval(_GPU_CHECK, {"torch": torch}))
    try:
        r = subprocess.run([python, "-c", f"import sys, torch; sys.exit(0 if ({_GPU_CHECK}) else 3)"],
                           env={**os.environ, **(env or {})}, timeout=120, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


class ComfyServer:
    """Context manager running ``python main.py`` of a ComfyUI tree on a free local port.

    Parameters:
      comfyui_dir: the ComfyUI tree (holds ``main.py``).
      pack_dir: the pack to install (default: this repo); ``None``/``False`` installs nothing.
      pack_name: its folder name under custom_nodes/.
      models: ``{folder: [files or dirs]}`` linked into ``models/<folder>/`` (e.g. ``checkpoints``,
        ``embeddings``, ``category_libraries``).
      inputs: files (or folders) copied into ``input/``. Copied, not linked: ComfyUI 0.33 refuses an
        input whose real path lies outside the input folder.
      python: interpreter for the server (default: the current one).
      cpu: pass ``--cpu``; ``None`` (default) follows the machine: ``--cpu`` only when ``python``
        finds no GPU (:func:`gpu_usable`).
      extra_args: more ComfyUI arguments.
      timeout: seconds to wait until ``GET /object_info`` answers.
      base_dir: use this (existing or new) directory as base instead of a temporary one (kept).
      env: extra environment variables for the server.
      extra_custom_nodes: more custom node folders linked into ``custom_nodes/`` under their own
        names (test-only ones such as devkit/tiny_dit_loaders, never part of the pack).
    """

    def __init__(self, comfyui_dir, *, pack_dir=PACK_ROOT, pack_name: str = DEFAULT_PACK_NAME,
                 models: dict | None = None, inputs=(), python: str | None = None, cpu: bool | None = None,
                 extra_args=(), timeout: float = 180.0, host: str = "127.0.0.1",
                 base_dir=None, env: dict | None = None, disable_api_nodes: bool = True,
                 extra_custom_nodes=()):
        self.comfyui_dir = Path(comfyui_dir).resolve()
        if not (self.comfyui_dir / "main.py").is_file():
            raise ProductSceneError(f"comfyui_dir: expected a ComfyUI tree with main.py, got {self.comfyui_dir}")
        self.pack_dir = Path(pack_dir).resolve() if pack_dir else None
        self.pack_name = pack_name
        if self.pack_dir is not None and pack_name == self.pack_dir.name:
            raise ProductSceneError(
                f"pack_name: expected a folder name other than the repo's ({pack_name!r}), so that the "
                "pack is tested the way users install it")
        self.models = {k: [Path(p) for p in v] for k, v in (models or {}).items()}
        self.inputs = [Path(p) for p in inputs]
        self.extra_custom_nodes = [Path(p).resolve() for p in extra_custom_nodes]
        for folder in self.extra_custom_nodes:
            if not (folder / "__init__.py").is_file():
                raise ProductSceneError(f"extra_custom_nodes: expected a custom node folder with __init__.py, got {folder}")
        self.python = python or sys.executable
        self.cpu = cpu
        self._use_cpu: bool | None = None if cpu is None else bool(cpu)
        self.main_py = self.comfyui_dir / "main.py"
        self.extra_args = list(extra_args)
        self.timeout = timeout
        self.host = host
        self.env = dict(env or {})
        self.disable_api_nodes = disable_api_nodes
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir).resolve() if base_dir else None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log = None

    # ------------------------------------------------------------------ layout
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def use_cpu(self) -> bool:
        """``--cpu`` or not: the ``cpu`` argument, else whether ``python`` finds no GPU (asked once)."""
        if self._use_cpu is None:
            self._use_cpu = not gpu_usable(self.python, self.env)
        return self._use_cpu

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    @property
    def pack_path(self) -> Path:
        return self.custom_nodes_dir / self.pack_name

    def _prepare(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="productscene-comfyui-"))
        for sub in PRIVATE_DIRS:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.pack_dir is not None and not self.pack_path.exists():
            _place(self.pack_dir, self.pack_path)
        for folder in self.extra_custom_nodes:
            if not (self.custom_nodes_dir / folder.name).exists():
                _place(folder, self.custom_nodes_dir / folder.name)
        for folder, files in self.models.items():
            for f in files:
                if not f.exists():
                    raise ProductSceneError(f"models[{folder!r}]: file not found: {f}")
                _place(f.resolve(), self.base_dir / "models" / folder / f.name)
        for f in self.inputs:
            if not f.exists():
                raise ProductSceneError(f"inputs: file not found: {f}")
            _place(f.resolve(), self.base_dir / "input" / f.name, copy=True)
        if (self.comfyui_dir / "extra_model_paths.yaml").exists():
            # main.py always reads extra_model_paths.yaml beside its real path; run it from a shim
            # tree (copied main.py, everything else linked) so the user's model paths stay out.
            shim = self.base_dir / "comfyui"
            if not shim.exists():
                shim.mkdir()
                for entry in self.comfyui_dir.iterdir():
                    if entry.name in ("extra_model_paths.yaml", "main.py"):
                        continue
                    (shim / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
                shutil.copy2(self.comfyui_dir / "main.py", shim / "main.py")
            self.main_py = shim / "main.py"

    def command(self) -> list[str]:
        cmd = [self.python, str(self.main_py), "--listen", self.host, "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        if self.use_cpu:
            cmd.append("--cpu")
        if self.disable_api_nodes:
            cmd.append("--disable-api-nodes")
        return cmd + self.extra_args

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ComfyServer":
        self._prepare()
        return self._launch()

    def _launch(self, port: int | None = None) -> "ComfyServer":
        self.log_path = self.base_dir / "server.log"
        last_error = None
        for _attempt in range(3):  # a free port can be taken between probing and binding
            self.port = port or free_port(self.host)
            self._log = open(self.log_path, "ab")
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
            self.proc = subprocess.Popen(self.command(), cwd=str(self.main_py.parent), stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
            try:
                self._wait_ready()
                return self
            except ProductSceneError as e:
                last_error = e
                self.stop(keep_base=True)
                if "address already in use" not in self.log_tail(40).lower():
                    break
            except BaseException:  # KeyboardInterrupt etc.: never leave a server behind
                self.stop()
                raise
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        raise last_error

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ProductSceneError(
                    f"ComfyUI exited with code {code} before it answered /object_info "
                    f"(command: {' '.join(self.command())}). Last lines of its log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=10) as r:
                    if r.status == 200:
                        json.loads(r.read())
                        return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ProductSceneError(
                    f"ComfyUI did not answer /object_info within {self.timeout:.0f} s at {self.url}. "
                    f"Last lines of its log:\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as f:
            tail = deque(f, maxlen=lines)
        return b"".join(tail).decode("utf-8", "replace")

    def stop(self, keep_base: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
                except (ProcessLookupError, PermissionError, AttributeError):
                    proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if not keep_base and self._own_base and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL to its process group), as a crash would. Its base
        directory stays, so :meth:`restart` brings it back with the same models and inputs."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, AttributeError):
                self.proc.kill()
            self.proc.wait(timeout=10)
        self.stop(keep_base=True)

    def restart(self) -> "ComfyServer":
        """Start the server again on the same port and base directory (after :meth:`kill` or
        :meth:`stop` with ``keep_base``, or while it runs: then it is stopped first)."""
        if self.port is None or self.base_dir is None:
            raise ProductSceneError("restart: the server was never started")
        port = self.port
        self.stop(keep_base=True)
        return self._launch(port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self):
        from productscene.client import ComfyClient
        return ComfyClient(self.url)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
