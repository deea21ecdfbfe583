"""Train Category Library node: learns every category's identifier plus one shared LoRA from a
data set folder, with the mask-guided gate on, and writes a category library."""
from __future__ import annotations

import os

import folder_paths
import comfy.model_management as mm
from comfy_api.v0_0_2 import io

from productscene.errors import ProductSceneError
from productscene.prompt import DEFAULT_TEMPLATE
from productscene.train.recipes.categories import CategoryConfig, check_outputs, train_category_library
from .paths import LIBRARY_FOLDER, _check_name
from .live_progress import LiveProgress
from .training_host import ComfyProgress, ComfyTrainingHost


def library_folder() -> str:
    paths = folder_paths.get_folder_paths(LIBRARY_FOLDER)
    return paths[0] if paths else os.path.join(folder_paths.models_dir, LIBRARY_FOLDER)


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


class ProductSceneTrainCategoryLibrary(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneTrainCategoryLibrary",
            display_name="Train Category Library (ProductScene)",
            category="ProductScene/training",
            description=("Learns one identifier per product category plus one shared LoRA from (image, product mask, "
                         "category) examples, with the identifier kept off product pixels, and writes a category "
                         "library to models/category_libraries. Cancel keeps a checkpoint; run again with resume on."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to train for (SD1.5, SD2.x or SDXL)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint; identifiers are learned in its embedding space."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; images are encoded once and cached."),
                io.String.Input("data_folder", default="",
                                tooltip="Data set folder (absolute, or relative to ComfyUI's input folder). Folder layout: "
                                        "<category>/<image>.png with alpha, or with a sibling <image>_mask.png."),
                io.Combo.Input("layout", options=["folder", "bg60k"], default="folder",
                               tooltip="folder: one sub-folder per category. bg60k: the BG60k layout (bg60k_info.txt, "
                                       "bg60k_imgs_*/, {id}_mask.png cut-outs)."),
                io.Int.Input("steps", default=1000, min=1, max=1000000,
                             tooltip="Optimizer steps in total (a resumed run continues up to this number)."),
                io.Float.Input("lr_tokens", default=0.005, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Learning rate of the category identifier vectors."),
                io.Float.Input("lr_lora", default=0.0001, min=1e-7, max=1.0, step=1e-6,
                               tooltip="Learning rate of the shared LoRA on the UNet's attention projections."),
                io.Int.Input("lora_rank", default=4, min=1, max=128, tooltip="Rank of the shared LoRA."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training images are scaled and centre-cropped to this square size (multiple of 64)."),
                io.Int.Input("batch_size", default=2, min=1, max=64, tooltip="Images per optimizer step."),
                io.String.Input("template", default=DEFAULT_TEMPLATE,
                                tooltip="Training prompt; {category} (once) marks the identifier. Use the same wording "
                                        "in the Category Tokens node."),
                io.String.Input("output_name", default="my_categories",
                                tooltip="Library file name written to models/category_libraries (.safetensors added)."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=1000000,
                             tooltip="Save the training state every N steps (0: only at the end and on cancel)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from this output name's saved training state, if there is one."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed of data order, noise and timesteps (same seed, same result)."),
            ],
            outputs=[
                io.String.Output(display_name="library", tooltip="File name of the written library in models/category_libraries."),
                io.Image.Output(display_name="loss_graph", tooltip="Training loss per step (light) and its moving average (dark)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, data_folder, layout, steps, lr_tokens, lr_lora, lora_rank, resolution,
                batch_size, template, output_name, checkpoint_every, resume, seed) -> io.NodeOutput:
        name = output_file_name(output_name)
        library = os.path.join(library_folder(), name)
        state = os.path.join(work_folder("checkpoints"), os.path.splitext(name)[0] + ".checkpoint.safetensors")
        check_outputs(library, state, resume=resume, out="output_name",
                      shown_out=f"{LIBRARY_FOLDER}/{name}", shown_state=f"{os.path.splitext(name)[0]} (saved training state)",
                      hint="choose another output_name, turn resume on to continue its training, or delete the file")
        data = resolve_data(data_folder)
        config = CategoryConfig(template=template, rank=lora_rank, batch_size=batch_size, resolution=resolution,
                                steps=steps, lr_tokens=lr_tokens, lr_lora=lr_lora)
        run = train_category_library(
            ComfyTrainingHost(model, clip, vae), data, library, config, layout=layout,
            seed=seed, cache_dir=work_folder("latent_cache"), checkpoint_path=state,
            checkpoint_every=checkpoint_every, resume=resume, progress=LiveProgress(steps),
            latent_progress=ComfyProgress(1), should_stop=mm.processing_interrupted)
        if run.cancelled:  # state saved; let ComfyUI show the run as interrupted
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException()
        return io.NodeOutput(name, run.graph)


NODES = [ProductSceneTrainCategoryLibrary]
