"""Train Personality Adapter node: learns a personality adapter self-supervised from a data set
folder (each image's own augmented background is its reference) and writes it to
models/personality_adapters. The run is the core's (``train_personality_adapter``)."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from productscene.train.recipes.personality import PersonalityConfig, train_personality_adapter
from .host import cross_attention_layers
from .paths import PERSONALITY_FOLDER
from .trainer_files import finished, model_folder, node_outputs, resolve_data, run_inputs, run_options, work_folder
from .training_host import ComfyProgress, ComfyTrainingHost


def adapter_folder() -> str:
    return model_folder(PERSONALITY_FOLDER)


def vision_encoder(clip_vision, output: str = "penultimate_hidden_states"):
    """``images [B,H,W,3] -> penultimate states [B,N,W]`` of a ComfyUI CLIP vision model (the
    whole image, squashed to its square, as Personality Reference encodes); ``output="image_embeds"``:
    the pooled embedding ``[B, W]`` a plain IP-Adapter reads."""
    def encode(images: torch.Tensor) -> torch.Tensor:
        return clip_vision.encode_image(images, crop=False)[output]
    return encode


def vision_width(clip_vision, output: str = "penultimate_hidden_states") -> int:
    return int(clip_vision.encode_image(torch.zeros(1, 64, 64, 3), crop=False)[output].shape[-1])


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
                *run_inputs("my_personality", "Adapter file name written to models/personality_adapters (.safetensors added).",
                            "data order, augmentation", "the training prompt with the first image's background as reference"),
            ],
            outputs=[
                io.String.Output(display_name="adapter", tooltip="File name of the written adapter in models/personality_adapters."),
                io.Image.Output(display_name="loss_graph", tooltip="Training loss per step (light) and its moving average (dark)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, data_folder, layout, steps, lr, tokens, resolution, batch_size,
                prompt, output_name, checkpoint_every, resume, seed, preview_every=0) -> io.NodeOutput:
        name, out, state = node_outputs(PERSONALITY_FOLDER, output_name, ".personality-checkpoint.safetensors", resume)
        data = resolve_data(data_folder)
        config = PersonalityConfig(tokens=tokens, prompt=prompt, batch_size=batch_size, resolution=resolution,
                                   steps=steps, lr=lr)
        host = ComfyTrainingHost(model, clip, vae)
        run = train_personality_adapter(
            host, data, out, config, run_options(steps, state, checkpoint_every, resume, seed, preview_every),
            encode_vision=vision_encoder(clip_vision), vision_width=vision_width(clip_vision),
            layers=cross_attention_layers(host.model), layout=layout, cache_dir=work_folder("latent_cache"),
            latent_progress=ComfyProgress(1))
        return io.NodeOutput(name, finished(run).graph)


NODES = [ProductSceneTrainPersonalityAdapter]
