"""Multi-Concept Inversion and Concept Tokens at host level (ComfyUI's real classes, tiny models):
the files reload and reproduce the same conditioning, each token works with ComfyUI's
``embedding:`` syntax, a concept and a category share one prompt, cancel keeps a loadable state
and resume matches an uninterrupted run (issue 13, evidence 3)."""
from __future__ import annotations

import os

import pytest
import torch

import folder_paths
from productscene.errors import ProductSceneError
from productscene.library import TokenLibrary
from productscene.train.recipes.concepts import ConceptConfig, train_concepts
from devkit.comfy_env import import_comfy_nodes, import_pack
from tests.test_concepts import scene

pack = import_pack()
nodes = import_comfy_nodes()
MCI = pack.nodes.train_concepts.ProductSceneMultiConceptInversion
CT = pack.nodes.concept_tokens.ProductSceneConceptTokens


def _train(tm, name, **over):
    image, masks = scene()
    kw = dict(model=tm.model, clip=tm.clip, vae=tm.vae, image=image, masks=masks, names="bottle, cap",
              init_words="bottle", background=False, phase1_steps=2, phase2_steps=2, lr_phase1=1e-2,
              lr_phase2=1e-3, unet="lora", lora_rank=2, resolution=0, batch_size=2, attention_weight=0.01,
              output_name=name, checkpoint_every=0, resume=False, seed=0)
    kw.update(over)
    with torch.inference_mode():  # as ComfyUI executes nodes
        return MCI.execute(**kw).args


def test_schemas_have_tooltips():
    for node in (MCI, CT):
        schema = node.define_schema()
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), schema.node_id
    assert MCI in pack.nodes.NODES and CT in pack.nodes.NODES


@pytest.fixture(scope="module")
def trained(sd15):
    tokens, lora, graph, history = _train(sd15, "node_concepts")
    return tokens, lora, graph, history


def test_node_writes_tokens_lora_embeddings_history(trained):
    tokens, lora, graph, history = trained
    assert tokens == "node_concepts.safetensors" and lora == "node_concepts.safetensors"
    lib = TokenLibrary.open(pack.nodes.paths.resolve_library(tokens))
    assert lib.names == ["<bottle>", "<cap>"] and lib.has_lora and lib.init_words["<cap>"] == "bottle"
    assert folder_paths.get_full_path("loras", lora) is not None
    for c in ("bottle", "cap"):
        assert folder_paths.get_full_path("embeddings", f"node_concepts_{c}.safetensors") is not None
    assert os.path.isfile(history) and graph.shape[-1] == 3


def test_node_never_replaces_its_files_without_being_asked(sd15, trained):
    """The token file, its LoRA, its textual-inversion files: a second run under the same name is
    refused before any work, naming the file and what to do, and every file stays as it was."""
    tokens, lora, _graph, _history = trained
    files = [pack.nodes.paths.resolve_library(tokens), folder_paths.get_full_path("loras", lora),
             *(folder_paths.get_full_path("embeddings", f"node_concepts_{c}.safetensors") for c in ("bottle", "cap"))]
    before = [open(f, "rb").read() for f in files]
    with pytest.raises(ProductSceneError, match=r"^output_name: 'category_libraries/node_concepts.safetensors' "
                                                r"already exists.*turn resume on"):
        _train(sd15, "node_concepts")
    # only a textual-inversion file of that name is there (a user's own): still refused, still kept
    emb = folder_paths.get_full_path("embeddings", "node_concepts_bottle.safetensors")
    other = os.path.join(os.path.dirname(emb), "lonely_bottle.safetensors")
    with open(other, "wb") as f:
        f.write(b"a user's own embedding")
    with pytest.raises(ProductSceneError, match=r"^output_name: 'embeddings/lonely_bottle.safetensors' already exists"):
        _train(sd15, "lonely", phase1_steps=1, phase2_steps=1)
    assert [open(f, "rb").read() for f in files] == before
    assert open(other, "rb").read() == b"a user's own embedding"
    assert not os.path.exists(os.path.join(os.path.dirname(files[0]), "lonely.safetensors"))


def test_node_shows_sample_previews_beside_the_loss_curve(sd15):
    """preview_every: every N steps and at the end the node's preview image is what the model draws
    now for every concept in one prompt (a real sample through the model and its VAE), left of the
    loss curve; without previews the image is the curve alone, and the trained files are the same."""
    from tests.support.progress_hook import progress_previews

    live = pack.nodes.live_progress
    with progress_previews() as shown:
        _train(sd15, "preview_concepts", phase1_steps=2, phase2_steps=2, preview_every=2)
    with progress_previews() as plain:
        _train(sd15, "plain_concepts", phase1_steps=2, phase2_steps=2, preview_every=0)
    graph_w = live.PREVIEW_SIZE[0]
    with_sample = [(v, im) for v, im in shown if im.width > graph_w]
    assert [v for v, _ in with_sample][:2] == [2, 4], [v for v, _ in shown]
    assert plain and all(im.width == graph_w for _, im in plain)
    sample = with_sample[-1][1].crop((0, 0, with_sample[-1][1].width - graph_w, live.PREVIEW_SIZE[1]))
    assert len(set(sample.convert("RGB").resize((16, 16)).getdata())) > 20  # a picture, not a blank
    a = TokenLibrary.open(pack.nodes.paths.resolve_library("preview_concepts.safetensors"))
    b = TokenLibrary.open(pack.nodes.paths.resolve_library("plain_concepts.safetensors"))
    for name in a.names:
        for e, v in a.vectors(name).items():
            assert torch.equal(v, b.vectors(name)[e])  # previews change nothing that is trained


def test_concept_tokens_reproduce_the_trained_conditioning_and_embedding_syntax(sd15, trained):
    tokens = trained[0]
    model, cond, ct = CT.execute(sd15.model, sd15.clip, tokens, "a photo of <bottle> and <cap>", 1.0).args
    assert ct is None and model is not sd15.model  # LoRA applied on a clone
    # the same vectors through the trainer's own encoding path
    lib = TokenLibrary.open(pack.nodes.paths.resolve_library(tokens))
    host = pack.nodes.training_host.ComfyTrainingHost(sd15.model, sd15.clip, sd15.vae)
    from productscene.prompt import Prompt
    enc = host.encode([Prompt("a photo of <bottle> and <cap>", {n: lib.vectors(n) for n in lib.names})])
    torch.testing.assert_close(cond[0][0], enc.cond.detach(), rtol=0, atol=0)
    # each token's textual-inversion file through ComfyUI's embedding: syntax gives the same prompt
    tok = sd15.clip.tokenizer.clip_l
    old = tok.embedding_directory
    tok.embedding_directory = folder_paths.get_folder_paths("embeddings")
    try:
        ref = nodes.CLIPTextEncode().encode(
            sd15.clip, "a photo of embedding:node_concepts_bottle and embedding:node_concepts_cap")[0]
    finally:
        tok.embedding_directory = old
    torch.testing.assert_close(cond[0][0], ref[0][0], rtol=0, atol=1e-6)
    other = nodes.CLIPTextEncode().encode(sd15.clip, "a photo of bottle and cap")[0]
    assert not torch.allclose(cond[0][0], other[0][0], atol=1e-3)


def test_concept_and_category_share_one_prompt(sd15, trained):
    lib_name = "concept_cat.safetensors"
    folder = folder_paths.get_folder_paths("category_libraries")[0]
    os.makedirs(folder, exist_ok=True)
    TokenLibrary.write(os.path.join(folder, lib_name), ["marble", "wood"], {"clip_l": torch.randn(2, 1, 768)}, "sd15")
    text = "a photo of <bottle> on a {category} background"
    _, cond, ct = CT.execute(sd15.model, sd15.clip, trained[0], text, 1.0, lib_name, "marble").args
    assert ct.category == "marble" and ct.free_context is not None and ct.free_context.shape == cond[0][0].shape
    # only the context carries the category: the global (pooled) vector is the category-free prompt's
    _, cond_wood, _ = CT.execute(sd15.model, sd15.clip, trained[0], text, 1.0, lib_name, "wood").args
    assert not torch.equal(cond[0][0], cond_wood[0][0])
    assert torch.equal(cond[0][1]["pooled_output"], cond_wood[0][1]["pooled_output"])
    # the gate works on it: Masked Category Attention accepts the pair
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    pack.nodes.category_attention.MaskedCategoryAttention.execute(sd15.model, mask, ct, 1.0, 1, 1.0)
    # the free context still holds the concept: it differs from the prompt without it
    _, cond2, ct2 = CT.execute(sd15.model, sd15.clip, trained[0], "a photo of <cap> on a {category} background",
                               1.0, lib_name, "marble").args
    assert not torch.equal(ct.free_context, ct2.free_context)


@pytest.mark.parametrize("text, inputs, match", [
    ("a photo of <bottel>", (), "not a concept.*Did you mean: '<bottle>'"),
    ("a photo of a bottle", (), "names no concept"),
    ("a photo of <bottle> on {category}", (), "no category library"),
    ("a photo of <bottle> on {category} {category}", ("concept_cat.safetensors", "marble"), "exactly once"),
    ("a photo of <bottle>", ("concept_cat.safetensors", "none"), "both a category library and a category"),
])
def test_concept_tokens_errors(sd15, sd2, trained, text, inputs, match):
    with pytest.raises(ProductSceneError, match=match):
        CT.execute(sd15.model, sd15.clip, trained[0], text, 1.0, *inputs)


def test_concept_tokens_refuses_another_family(sd2, trained):
    with pytest.raises(ProductSceneError, match="tokens: 'node_concepts.safetensors' was made for sd15"):
        CT.execute(sd2.model, sd2.clip, trained[0], "a photo of <bottle>", 1.0)


def test_cancel_leaves_a_loadable_checkpoint_and_resume_matches(sd15, tmp_path):
    from productscene.train.engine import read_checkpoint_info
    host = pack.nodes.training_host.ComfyTrainingHost(sd15.model, sd15.clip, sd15.vae)
    image, masks = scene()
    cfg = ConceptConfig(resolution=0, phase1_steps=3, phase2_steps=3, lr_phase1=1e-2, lr_phase2=1e-3, batch_size=2)
    full = train_concepts(host, image, masks, tmp_path / "full.safetensors", cfg, seed=4)
    calls = {"n": 0}

    def stop():  # cancel in the middle of phase 2 (after 4 steps)
        calls["n"] += 1
        return calls["n"] > 4

    ckpt = tmp_path / "state.safetensors"
    cut = train_concepts(host, image, masks, tmp_path / "cut.safetensors", cfg, seed=4, checkpoint_path=ckpt,
                         should_stop=stop)
    assert cut.cancelled and not (tmp_path / "cut.safetensors").exists()
    assert read_checkpoint_info(ckpt)["step"] == 4
    resumed = train_concepts(host, image, masks, tmp_path / "cut.safetensors", cfg, seed=4, checkpoint_path=ckpt,
                             resume=True)
    a, b = TokenLibrary.open(full.tokens), TokenLibrary.open(resumed.tokens)
    torch.testing.assert_close(b.all_vectors()["clip_l"], a.all_vectors()["clip_l"], rtol=1e-5, atol=1e-6)
    la, lb = a.lora_state_dict(), b.lora_state_dict()
    assert la.keys() == lb.keys()
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=1e-5, atol=1e-6)
    assert resumed.result.history == pytest.approx(full.result.history, rel=1e-5)


def test_textual_inversion_file_loads_into_a_diffusers_pipeline(trained):
    """The per-token file is a standard textual-inversion file: diffusers' ``load_textual_inversion``
    adds the token to a (small, SD1.5-shaped) pipeline's tokenizer with exactly the learned vector."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from devkit.comfy_env import COMFYUI_DIR

    tokenizer = CLIPTokenizer.from_pretrained(str(COMFYUI_DIR / "comfy" / "sd1_tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, vocab_size=len(tokenizer)))
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = folder_paths.get_full_path("embeddings", "node_concepts_bottle.safetensors")
    pipe.load_textual_inversion(path)
    token_id = tokenizer.convert_tokens_to_ids("<bottle>")
    assert token_id >= 49408  # a new token after CLIP's vocabulary
    assert tokenizer("a photo of <bottle>").input_ids[4] == token_id
    lib = TokenLibrary.open(pack.nodes.paths.resolve_library(trained[0]))
    row = text_encoder.get_input_embeddings().weight[token_id].detach()
    torch.testing.assert_close(row, lib.vectors("<bottle>")["clip_l"][0], rtol=0, atol=0)


def test_node_phase2_rate_zero_follows_the_unet_choice(sd15):
    """The node's lr_phase2 default (0) trains phase 2 at LR_PHASE2[unet]; the written file says so."""
    from productscene.train.recipes.concepts import LR_PHASE2
    for unet in ("lora", "full"):
        tokens, *_ = _train(sd15, f"node_rate_{unet}", lr_phase2=0.0, unet=unet, phase1_steps=0, phase2_steps=1)
        lib = TokenLibrary.open(pack.nodes.paths.resolve_library(tokens))
        assert lib.training["config"]["lr_phase2"] == LR_PHASE2[unet] and lib.training["config"]["unet"] == unet
