"""What every trainer node shares: where its files go (models/<folder>, the user folder's
productscene/ for training state), its output_name checked before any work (never replacing a file
unless resumed), its data_folder kept inside the input folder, its run options (the trailing run
inputs, ComfyUI's progress and cancel) and a cancelled run turned into ComfyUI's interrupt (the
state of the last completed step is saved by then)."""
from __future__ import annotations

import os

import folder_paths
import comfy.model_management as mm
from comfy_api.v0_0_2 import io

from productscene.errors import ProductSceneError
from productscene.train.run import RunOptions, check_outputs
from .live_progress import LiveProgress
from .paths import _check_name

RESUME_HINT = "choose another output_name, turn resume on to continue its training, or delete the file"


def run_inputs(output_default: str, output_tooltip: str, seeded: str, previewed: str) -> list:
    """The inputs every trainer node ends with: output_name, checkpoint_every, resume, seed
    (``seeded``: what the seed draws besides noise and timesteps) and preview_every (``previewed``:
    what its preview draws)."""
    return [
        io.String.Input("output_name", default=output_default, tooltip=output_tooltip),
        io.Int.Input("checkpoint_every", default=100, min=0, max=1000000,
                     tooltip="Save the training state every N steps (0: only at the end and on cancel)."),
        io.Boolean.Input("resume", default=False,
                         tooltip="Continue from this output name's saved training state, if there is one."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                     tooltip=f"Seed of {seeded}, noise and timesteps (same seed, same result)."),
        io.Int.Input("preview_every", default=100, min=0, max=1000000,
                     tooltip=f"Every N steps (and at the end) draw {previewed} with the model as it is now, "
                             f"shown on the node beside the loss curve (a quick 8-step sample; 0: no previews). "
                             f"Previews never change what is trained."),
    ]


def model_folder(kind: str) -> str:
    paths = folder_paths.get_folder_paths(kind)
    return paths[0] if paths else os.path.join(folder_paths.models_dir, kind)


def work_folder(kind: str) -> str:
    """Training state outside the model folders: ``<user dir>/productscene/<kind>``."""
    path = os.path.join(folder_paths.get_user_directory(), "productscene", kind)
    os.makedirs(path, exist_ok=True)
    return path


def output_file_name(name: str) -> str:
    name = name.strip()
    _check_name(name, "output_name")
    if "/" in name.replace("\\", "/"):
        raise ProductSceneError(f"output_name: {name!r} must be a plain file name (no folders)")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return name


DATA_ROOTS_ENV = "PRODUCTSCENE_DATA_ROOTS"


def allowed_data_roots() -> list[str]:
    """ComfyUI's input folder, plus the folders the server's owner lists in the environment
    variable ``PRODUCTSCENE_DATA_ROOTS`` (separated by the platform's path separator)."""
    extra = [p for p in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [os.path.realpath(p) for p in [folder_paths.get_input_directory(), *extra]]


def resolve_data(folder: str) -> str:
    """A data set folder inside the input folder (or an allowed root). Anything else is refused
    without saying what exists where on the server."""
    folder = (folder or "").strip()
    if not folder:
        raise ProductSceneError("data_folder: expected the path of a data set folder")
    path = os.path.realpath(folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder))
    if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in allowed_data_roots()):
        raise ProductSceneError(
            f"data_folder: {folder!r} is outside ComfyUI's input folder; give a folder inside it (a relative path, "
            f"no '..' out of it). The server's owner can allow more folders with the environment variable "
            f"{DATA_ROOTS_ENV}")
    if not os.path.isdir(path):
        raise ProductSceneError(f"data_folder: {folder!r} is not a folder (relative paths start in ComfyUI's input folder)")
    return path


def shown(path: str) -> str:
    """How a message shows one of a trainer's files: ``<models folder>/<name>`` for a model file, the
    name and "(saved training state)" for a file in the work folder, the name otherwise."""
    path = os.path.abspath(path)
    work = os.path.join(folder_paths.get_user_directory(), "productscene")
    if path.startswith(os.path.abspath(work) + os.sep):
        return f"{os.path.splitext(os.path.basename(path))[0]} (saved training state)"
    models = os.path.abspath(folder_paths.models_dir)
    if path.startswith(models + os.sep):
        return os.path.relpath(path, models).replace(os.sep, "/")
    return os.path.basename(path)


def node_outputs(folder: str, output_name: str, state_suffix: str, resume: bool) -> tuple[str, str, str]:
    """``(file name, path in models/<folder>, training state path)`` of a trainer node's
    ``output_name``, checked before any work: writable, and replacing nothing unless resumed."""
    name = output_file_name(output_name)
    out = os.path.join(model_folder(folder), name)
    state = os.path.join(work_folder("checkpoints"), os.path.splitext(name)[0] + state_suffix)
    check_outputs(out, state, resume=resume, out="output_name", shown_out=shown(out), shown_state=shown(state),
                  hint=RESUME_HINT)
    return name, out, state


def run_options(steps: int, state: str, checkpoint_every: int, resume: bool, seed: int,
                preview_every: int) -> RunOptions:
    """A trainer node's run of ``steps`` steps: its training state, the trailing run inputs, the
    live loss curve (and previews) on the node, and ComfyUI's cancel."""
    live = LiveProgress(steps)
    return RunOptions(seed=seed, checkpoint_path=state, checkpoint_every=checkpoint_every, resume=resume,
                      progress=live, should_stop=mm.processing_interrupted, preview_every=preview_every,
                      on_preview=live.sample)


def finished(run):
    """``run``, or ComfyUI's interrupt when it was cancelled (its training state is saved), so the
    queue shows the run as interrupted."""
    if run.cancelled:
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()
    return run
