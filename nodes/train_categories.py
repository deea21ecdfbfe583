"""Train Category Library node: learns every category's identifier plus one shared LoRA from a
data set folder, with the mask-guided gate on, and writes a category library."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from productscene.prompt import DEFAULT_TEMPLATE
from productscene.train.recipes.categories import CategoryConfig, train_category_library
from .paths import LIBRARY_FOLDER
from .trainer_files import finished, model_folder, node_outputs, resolve_data, run_inputs, run_options, work_folder
from .training_host import ComfyProgress, training_host


def library_folder() -> str:
    return model_folder(LIBRARY_FOLDER)



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
                io.Model.Input("model", tooltip="The diffusion model to train for (SD1.5, SD2.x, SDXL, Flux.1 or Z-Image)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint (Flux.1: DualCLIPLoader type flux; Z-Image: CLIPLoader type lumina2); identifiers are learned in its embedding space."),
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
                               tooltip="Learning rate of the shared LoRA on the attention projections (UNet: self- and cross-attention; Flux.1 / Z-Image: the joint attention)."),
                io.Int.Input("lora_rank", default=4, min=1, max=128, tooltip="Rank of the shared LoRA."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training images are scaled and centre-cropped to this square size (multiple of 64)."),
                io.Int.Input("batch_size", default=2, min=1, max=64, tooltip="Images per optimizer step."),
                io.String.Input("template", default=DEFAULT_TEMPLATE,
                                tooltip="Training prompt; {category} (once) marks the identifier. Use the same wording "
                                        "in the Category Tokens node."),
                *run_inputs("my_categories", "Library file name written to models/category_libraries (.safetensors added).",
                            "data order", "the prompt under the first categories' identifiers"),
            ],
            outputs=[
                io.String.Output(display_name="library", tooltip="File name of the written library in models/category_libraries."),
                io.Image.Output(display_name="loss_graph", tooltip="Training loss per step (light) and its moving average (dark)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, data_folder, layout, steps, lr_tokens, lr_lora, lora_rank, resolution,
                batch_size, template, output_name, checkpoint_every, resume, seed, preview_every=0) -> io.NodeOutput:
        name, library, state = node_outputs(LIBRARY_FOLDER, output_name, ".checkpoint.safetensors", resume)
        data = resolve_data(data_folder)
        config = CategoryConfig(template=template, rank=lora_rank, batch_size=batch_size, resolution=resolution,
                                steps=steps, lr_tokens=lr_tokens, lr_lora=lr_lora)
        run = train_category_library(
            training_host(model, clip, vae), data, library, config,
            run_options(steps, state, checkpoint_every, resume, seed, preview_every), layout=layout,
            cache_dir=work_folder("latent_cache"), latent_progress=ComfyProgress(1))
        return io.NodeOutput(name, finished(run).graph)


NODES = [ProductSceneTrainCategoryLibrary]
