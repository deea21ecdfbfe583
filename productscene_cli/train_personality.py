"""``train-personality``: learn a personality adapter self-supervised from a data set."""
from __future__ import annotations

from productscene.ipadapter import inspect_file
from productscene.train.recipes.personality import PersonalityConfig, initial_from_ipadapter, train_personality_adapter

from . import comfyui
from .model_files import check_clip_vision, check_ipadapter
from .options import checked_training_inputs, data_args, default_cache, model_args, run_args, run_options
from .progress import train_interruptibly, trained


def register(sub) -> None:
    r = sub.add_parser("train-personality", help="train a personality adapter (a brand's style from reference images)",
                       description=run.__doc__)
    data_args(r)
    model_args(r, "personality adapter")
    r.add_argument("--clip-vision", required=True,
                   help="CLIP vision model (.safetensors) the references are encoded with; use the same one in "
                        "Personality Reference")
    r.add_argument("--tokens", type=int, default=16, help="reference tokens per image (a new adapter)")
    r.add_argument("--from-ipadapter", default=None, metavar="FILE",
                   help="fine-tune this IP-Adapter file (ip-adapter_sd15, ip-adapter-plus_sd15, the SDXL ones) on "
                        "your data instead of starting from scratch; the result keeps the IP-Adapter layout. Give "
                        "the CLIP vision model the file expects")
    r.add_argument("--prompt", default="a product photo",
                   help="the one training prompt; name no style, the reference is what should carry it")
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--lr", type=float, default=1e-4, help="learning rate of the adapter (an IP-Adapter file's image projection "
                                                                   "trains at a hundredth of it)")
    r.add_argument("--resolution", type=int, default=512, help="training resolution (multiple of 64)")
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation, noise and timesteps")
    r.add_argument("--license", default=None, help="licence text stored in the adapter (BG60k's own by default "
                                                   "with --layout bg60k)")
    run_args(r, "adapter")
    r.set_defaults(func=run)


def run(args) -> int:
    """Learn a personality adapter self-supervised from a data set (each image's own augmented
    background is its reference): the command-line twin of the Train Personality Adapter node, on
    the same core run. Only the adapter trains; the model and both encoders stay frozen."""
    check_clip_vision(args.clip_vision)
    kind = None
    if args.from_ipadapter is not None:  # its kind and family from the header, before any model loads
        _, kind = inspect_file(check_ipadapter(args.from_ipadapter), "from-ipadapter")
    config = PersonalityConfig(tokens=args.tokens, prompt=args.prompt, batch_size=args.batch_size,
                               resolution=args.resolution, steps=args.steps, lr=args.lr)
    checked = checked_training_inputs(args)  # every data problem before any model work
    if checked is None:
        return 1
    ckpt, dataset, report = checked
    options = run_options(args, ckpt)
    pack = comfyui.load_pack(args.comfyui, cpu=args.cpu)
    node = pack.nodes.train_personality
    model, clip, vae = comfyui.load_checkpoint(args.checkpoint)
    clip_vision = comfyui.load_clip_vision(args.clip_vision)
    host = pack.nodes.training_host.ComfyTrainingHost(model, clip, vae)
    output = "image_embeds" if kind == "linear" else "penultimate_hidden_states"
    layers, width = pack.nodes.host.cross_attention_layers(host.model), node.vision_width(clip_vision, output)
    initial = None if kind is None else initial_from_ipadapter(args.from_ipadapter, host.family, layers, width,
                                                               "from-ipadapter")
    done = train_interruptibly(lambda bars, should_stop: train_personality_adapter(
        host, dataset, args.out, config, options, encode_vision=node.vision_encoder(clip_vision, output),
        vision_width=width, layers=layers, initial=initial,
        layout=args.layout, split=args.split, checked=report, cache_dir=args.cache_dir or default_cache(),
        latent_progress=bars.latent_progress, license=args.license, progress=bars.progress,
        should_stop=should_stop), ckpt, args.steps, images=len(dataset), main=options.ranks.is_main)
    if done is None:
        return 130
    if not options.ranks.is_main:  # rank 0 wrote the file and says so
        return 0
    tokens = config.tokens if initial is None else initial.n_tokens
    print(f"wrote {done.adapter}: {tokens} reference tokens for {host.family}, {trained(done.result, ckpt)}")
    return 0
