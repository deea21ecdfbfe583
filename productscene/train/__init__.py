"""Training: one engine (:mod:`.engine`) for every recipe, LoRA, losses, union sampling, data sets,
and the recipes (:mod:`.recipes`). Host-free: no ComfyUI import anywhere in this package."""
from .engine import Phase, Recipe, Trainer, TrainResult, loss_graph, read_checkpoint_info, training_mode  # noqa: F401
