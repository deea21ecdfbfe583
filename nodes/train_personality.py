"""Train Personality Adapter node: learns a personality adapter self-supervised from a data set
folder (each image's own augmented background is its reference) and writes it to
models/personality_adapters. The run is the core's (``train_personality_adapter``)."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from productscene.errors import ProductSceneError
from productscene.ipadapter import inspect_file
from productscene.train.recipes.personality import PersonalityConfig, initial_from_ipadapter, train_personality_adapter
from .host import cross_attention_layers
from .paths import IPADAPTER_FOLDER, PERSONALITY_FOLDER
from .personality import adapter_path, ipadapter_files
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


NONE = "none"


def start_files() -> list[str]:
    """What the node can fine-tune: "none" (a new adapter), then the IP-Adapter files of
    models/personality_adapters (fine-tuned ones) and models/ipadapter."""
    return [NONE] + sorted(set(ipadapter_files(PERSONALITY_FOLDER)) | set(ipadapter_files(IPADAPTER_FOLDER)))


def start_file(name: str) -> tuple[str, str] | None:
    """``(path, kind)`` of the IP-Adapter file ``name`` to fine-tune (None for "none"), from its
    header: raises for a file that is missing or no IP-Adapter, before any work."""
    if name in (None, "", NONE):
        return None
    if not isinstance(name, str):
        raise ProductSceneError(f"from_ipadapter: expected a file name or {NONE!r}, got {type(name).__name__}")
    try:
        path = adapter_path(name)
    except ProductSceneError:
        raise ProductSceneError(f"from_ipadapter: {name!r} is in neither models/personality_adapters nor "
                                f"models/ipadapter; pick an IP-Adapter file or {NONE!r}") from None
    return path, inspect_file(path, "from_ipadapter")[1]


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
                               tooltip="Learning rate of the adapter (projection and per-layer to_k/to_v). An "
                                       "IP-Adapter file's image projection trains at a hundredth of it."),
                io.Int.Input("tokens", default=16, min=1, max=256, tooltip="Reference tokens per image (K)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training images are scaled and centre-cropped to this square size (multiple of 64)."),
                io.Int.Input("batch_size", default=2, min=1, max=64, tooltip="Images per optimizer step."),
                io.String.Input("prompt", default="a product photo",
                                tooltip="The one training prompt. Name no style: the reference is what should carry it."),
                *run_inputs("my_personality", "Adapter file name written to models/personality_adapters (.safetensors added).",
                            "data order, augmentation", "the training prompt with the first image's background as reference"),
                io.Combo.Input("from_ipadapter", options=start_files(), default=NONE, optional=True,
                               tooltip="Fine-tune this IP-Adapter file (from models/ipadapter, or one fine-tuned before "
                                       "in models/personality_adapters) on your data instead of starting a new adapter: "
                                       "ip-adapter_sd15 / ip-adapter-plus_sd15 for an SD1.5 model, the SDXL files for "
                                       "SDXL. The result keeps the IP-Adapter layout and its token count (tokens is "
                                       "ignored). Use the CLIP vision model the file was made for. none: a new adapter."),
            ],
            outputs=[
                io.String.Output(display_name="adapter", tooltip="File name of the written adapter in models/personality_adapters."),
                io.Image.Output(display_name="loss_graph", tooltip="Training loss per step (light) and its moving average (dark)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, data_folder, layout, steps, lr, tokens, resolution, batch_size,
                prompt, output_name, checkpoint_every, resume, seed, preview_every=0, from_ipadapter=NONE) -> io.NodeOutput:
        start = start_file(from_ipadapter)  # the file to fine-tune, checked before anything else
        name, out, state = node_outputs(PERSONALITY_FOLDER, output_name, ".personality-checkpoint.safetensors", resume)
        data = resolve_data(data_folder)
        config = PersonalityConfig(tokens=tokens, prompt=prompt, batch_size=batch_size, resolution=resolution,
                                   steps=steps, lr=lr)
        host = ComfyTrainingHost(model, clip, vae)
        output = "image_embeds" if start is not None and start[1] == "linear" else "penultimate_hidden_states"
        layers, width = cross_attention_layers(host.model), vision_width(clip_vision, output)
        initial = None if start is None else initial_from_ipadapter(start[0], host.family, layers, width)
        run = train_personality_adapter(
            host, data, out, config, run_options(steps, state, checkpoint_every, resume, seed, preview_every),
            encode_vision=vision_encoder(clip_vision, output), vision_width=width, layers=layers, initial=initial,
            layout=layout, cache_dir=work_folder("latent_cache"), latent_progress=ComfyProgress(1))
        return io.NodeOutput(name, finished(run).graph)


NODES = [ProductSceneTrainPersonalityAdapter]
