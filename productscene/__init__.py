"""ProductScene core: host-free algorithms (pure torch/numpy). Never imports ComfyUI."""
__version__ = "0.1.0"
