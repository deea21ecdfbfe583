"""Train Personality Adapter node: learns a personality adapter self-supervised from a data set
folder (each image's own augmented background is its reference) and writes it to
models/personality_adapters. The run is the core's (``train_personality_adapter``)."""
from __future__ import annotations

import os

import torch
import comfy.model_management as mm
from comfy_api.v0_0_2 import io

from productscene.train.recipes.categories import check_outputs
from productscene.train.recipes.personality import PersonalityConfig, train_personality_adapter
from .host import cross_attention_layers
from .live_progress import LiveProgress
from .paths import PERSONALITY_FOLDER
from .train_categories import output_file_name, resolve_data, work_folder
from .training_host import ComfyTrainingHost

import folder_paths


def adapter_folder() -> str:
    paths = folder_paths.get_folder_paths(PERSONALITY_FOLDER)
    return paths[0] if paths else os.path.join(folder_paths.models_dir, PERSONALITY_FOLDER)


def vision_encoder(clip_vision):
    """``images [B,H,W,3] -> penultimate states [B,N,W]`` of a ComfyUI CLIP vision model (the
    whole image, squashed to its square, as Personality Reference encodes)."""
    def encode(images: torch.Tensor) -> torch.Tensor:
        return clip_vision.encode_image(images, crop=False)["penultimate_hidden_states"]
    return encode


def vision_width(clip_vision) -> int:
    return int(clip_vision.encode_image(torch.zeros(1, 64, 64, 3), crop=False)["penultimate_hidden_states"].shape[-1])


class ProductSceneTrainPersonalityAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneTrainPersonalityAdapter",
            display_name="Train Personality Adapter (ProductScene)",
            category="ProductScene/training",
            description=("Learns a personality adapter self-supervised: each training image's own background (product "
                         "filled, randomly cropped, flipped and colour-jittered) is its reference, so the adapter learns "
                         "to carry style, not pixels. Only the adapter trains. Writes models/personality_adapters/"
                         "<output_name>.safetensors. Cancel keeps a checkpoint; run again with resume on."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to train for (SD1.5, SD2.x or SDXL); it stays frozen."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint (encodes the fixed training prompt)."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; images are encoded once and cached."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model references will be encoded with "
                                    "(use the same one in Personality Reference)."),
                io.String.Input("data_folder", default="",
                                tooltip="Data set folder inside ComfyUI's input folder. Folder layout: <category>/<image>.png "
                                        "with alpha, or with a sibling <image>_mask.png; or the BG60k layout."),
                io.Combo.Input("layout", options=["folder", "bg60k"], default="folder",
                               tooltip="folder: one sub-folder per category. bg60k: the BG60k layout."),
                io.Int.Input("steps", default=1000, min=1, max=1000000,
                             tooltip="Optimizer steps in total (a resumed run continues up to this number)."),
                io.Float.Input("lr", default=0.0001, min=1e-7, max=1.0, step=1e-6,
                               tooltip="Learning rate of the adapter (projection and per-layer to_k/to_v)."),
                io.Int.Input("tokens", default=16, min=1, max=256, tooltip="Reference tokens per image (K)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training images are scaled and centre-cropped to this square size (multiple of 64)."),
                io.Int.Input("batch_size", default=2, min=1, max=64, tooltip="Images per optimizer step."),
                io.String.Input("prompt", default="a product photo",
                                tooltip="The one training prompt. Name no style: the reference is what should carry it."),
                io.String.Input("output_name", default="my_personality",
                                tooltip="Adapter file name written to models/personality_adapters (.safetensors added)."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=1000000,
                             tooltip="Save the training state every N steps (0: only at the end and on cancel)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from this output name's saved training state, if there is one."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed of data order, augmentation, noise and timesteps (same seed, same result)."),
            ],
            outputs=[
                io.String.Output(display_name="adapter", tooltip="File name of the written adapter in models/personality_adapters."),
                io.Image.Output(display_name="loss_graph", tooltip="Training loss per step (light) and its moving average (dark)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, data_folder, layout, steps, lr, tokens, resolution, batch_size,
                prompt, output_name, checkpoint_every, resume, seed) -> io.NodeOutput:
        name = output_file_name(output_name)
        out = os.path.join(adapter_folder(), name)
        state = os.path.join(work_folder("checkpoints"), os.path.splitext(name)[0] + ".personality-checkpoint.safetensors")
        check_outputs(out, state, resume=resume, out="output_name",
                      shown_out=f"{PERSONALITY_FOLDER}/{name}", shown_state=f"{os.path.splitext(name)[0]} (saved training state)",
                      hint="choose another output_name, turn resume on to continue its training, or delete the file")
        data = resolve_data(data_folder)
        config = PersonalityConfig(tokens=tokens, prompt=prompt, batch_size=batch_size, resolution=resolution,
                                   steps=steps, lr=lr)
        host = ComfyTrainingHost(model, clip, vae)
        run = train_personality_adapter(
            host, data, out, config, encode_vision=vision_encoder(clip_vision), vision_width=vision_width(clip_vision),
            layers=cross_attention_layers(host.model), layout=layout, seed=seed, cache_dir=work_folder("latent_cache"),
            checkpoint_path=state, checkpoint_every=checkpoint_every, resume=resume, progress=LiveProgress(steps),
            should_stop=mm.processing_interrupted)
        if run.cancelled:
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException()
        return io.NodeOutput(name, run.graph)


NODES = [ProductSceneTrainPersonalityAdapter]
