"""Multi-Concept Inversion node (Break-A-Scene): learns one token per masked concept of ONE image
(plus optionally the background), then a LoRA, and writes the concept-token file, the LoRA, one
textual-inversion file per token and the loss history. The run is
``productscene.train.recipes.concepts.train_concepts``; this module only adapts ComfyUI."""
from __future__ import annotations

import os

from comfy_api.v0_0_2 import io

from productscene.train.recipes.concepts import (MAX_CONCEPTS, ConceptConfig, check_concept_outputs, concept_names,
                                                 train_concepts)
from .paths import LIBRARY_FOLDER
from .trainer_files import (RESUME_HINT, finished, model_folder, output_file_name, run_inputs, run_options, shown,
                            work_folder)
from .training_host import ComfyTrainingHost


def split_words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in (text or "").split(",")) if (text or "").strip() else ()


class ProductSceneMultiConceptInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneMultiConceptInversion",
            display_name="Multi-Concept Inversion (ProductScene)",
            category="ProductScene/training",
            description=("Break-A-Scene: learns one token per masked concept of one image (and optionally the "
                         "background), phase 1 tokens only, phase 2 tokens plus a LoRA (or the full UNet). Writes "
                         "the concept-token file (for Concept Tokens), the LoRA (models/loras), one textual-inversion "
                         "file per token (models/embeddings, usable as embedding:name) and the loss history. Cancel "
                         "keeps a checkpoint; run again with resume on."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to learn on (SD1.5, SD2.x or SDXL)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint; tokens live in its embedding space."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint (the image is encoded once)."),
                io.Image.Input("image", tooltip="ONE image holding the concepts."),
                io.Mask.Input("masks", tooltip=f"One mask per concept (a MASK batch, 1 to {MAX_CONCEPTS}); any size "
                                               "(resized to the image), may overlap."),
                io.String.Input("names", default="",
                                tooltip="Comma-separated concept names, one per mask (e.g. bottle, cap -> <bottle>, <cap>). "
                                        "Empty: <concept1>, <concept2>, ..."),
                io.String.Input("init_words", default="",
                                tooltip="Comma-separated words the tokens start from (one per mask, or one for all). "
                                        "Empty: 'object'."),
                io.Boolean.Input("background", default=False,
                                 tooltip="Learn the background (everything outside the masks) as one more concept, <background>."),
                io.Int.Input("phase1_steps", default=400, min=0, max=100000, tooltip="Steps training only the new tokens."),
                io.Int.Input("phase2_steps", default=400, min=0, max=100000,
                             tooltip="Steps training the tokens plus the LoRA (or the full UNet)."),
                io.Float.Input("lr_phase1", default=5e-4, min=1e-8, max=1.0, step=1e-5, tooltip="Learning rate of phase 1."),
                io.Float.Input("lr_phase2", default=0.0, min=0.0, max=1.0, step=1e-7,
                               tooltip="Learning rate of phase 2. 0 = follows 'unet': 1e-4 for the LoRA, the "
                                       "published 2e-6 for the full UNet."),
                io.Combo.Input("unet", options=["lora", "full"], default="lora",
                               tooltip="Phase 2 trains a LoRA (small file, little memory) or the full UNet (saved as a "
                                       "weight-difference file that LoraLoader applies)."),
                io.Int.Input("lora_rank", default=4, min=1, max=128, tooltip="Rank of the LoRA."),
                io.Int.Input("resolution", default=512, min=0, max=2048, step=64,
                             tooltip="The image's longer side is scaled to this (0 = keep its size); both sides must "
                                     "come out as multiples of 64."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Union-sampled draws per step."),
                io.Float.Input("attention_weight", default=0.01, min=0.0, max=10.0, step=0.001,
                               tooltip="Weight of the cross-attention loss (each token's attention map against its mask)."),
                *run_inputs("my_concepts", "File name of the concept tokens (models/category_libraries) and of the "
                            "LoRA (models/loras); embeddings are <name>_<concept>.", "concept draws, flips",
                            "every concept in one prompt"),
                io.Image.Input("class_images", optional=True,
                               tooltip="Optional prior preservation: images of the class made by the same model."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.1, optional=True,
                               tooltip="Weight of the prior-preservation loss (used only with class_images)."),
                io.String.Input("class_prompt", default="a photo of an object", optional=True,
                                tooltip="Prompt the class images were made with."),
            ],
            outputs=[
                io.String.Output(display_name="tokens", tooltip="File name of the concept tokens (for Concept Tokens)."),
                io.String.Output(display_name="lora", tooltip="File name of the LoRA in models/loras."),
                io.Image.Output(display_name="loss_graph", tooltip="Training loss per step and its moving average."),
                io.String.Output(display_name="loss_history", tooltip="Path of the loss history (JSON)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, masks, names, init_words, background, phase1_steps, phase2_steps,
                lr_phase1, lr_phase2, unet, lora_rank, resolution, batch_size, attention_weight, output_name,
                checkpoint_every, resume, seed, preview_every=0, class_images=None, prior_weight=1.0,
                class_prompt="a photo of an object") -> io.NodeOutput:
        name = output_file_name(output_name)
        stem = os.path.splitext(name)[0]
        config = ConceptConfig(names=split_words(names), init_words=split_words(init_words), background=background,
                               phase1_steps=phase1_steps, phase2_steps=phase2_steps, lr_phase1=lr_phase1,
                               lr_phase2=lr_phase2 or None, unet=unet, rank=lora_rank, resolution=resolution,
                               batch_size=batch_size, attention_weight=attention_weight,
                               prior_weight=prior_weight if class_images is not None else 0.0, class_prompt=class_prompt)
        state = os.path.join(work_folder("checkpoints"), stem + ".concepts.checkpoint.safetensors")
        history = os.path.join(work_folder("history"), stem + ".loss.json")
        lora_name = stem + (".diff" if unet == "full" else "") + ".safetensors"
        out = os.path.join(model_folder(LIBRARY_FOLDER), name)
        lora_path, embeddings_dir = os.path.join(model_folder("loras"), lora_name), model_folder("embeddings")
        count = masks.shape[0] if masks.dim() == 3 else 1
        check_concept_outputs(out, concept_names(count, config.names, config.background), lora_path=lora_path,
                              embeddings_dir=embeddings_dir, checkpoint_path=state, resume=resume, out="output_name",
                              shown=shown, hint=RESUME_HINT)
        options = run_options(config.phase1_steps + config.phase2_steps, state, checkpoint_every, resume, seed,
                              preview_every)
        run = train_concepts(ComfyTrainingHost(model, clip, vae), image, masks, out, config, options,
                             lora_path=lora_path, embeddings_dir=embeddings_dir, history_path=history,
                             class_images=class_images)
        return io.NodeOutput(name, lora_name if finished(run).lora else "", run.graph, history)


NODES = [ProductSceneMultiConceptInversion]
