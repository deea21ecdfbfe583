"""Test helpers shared by every ProductScene test: the in-process ComfyUI environment
(``comfy_env``), tiny real ComfyUI models (``models``), a recording fake model patcher
(``mock_patcher``). Importing ``devkit.comfy_env`` makes ``comfy``/``nodes``/``folder_paths``
importable; ``tests/conftest.py`` does that before any test module is collected."""
