"""``python -m productscene``: the command line. It lives in ``productscene_cli``, above the core and
the ComfyUI adapters; this entry is the only place under ``productscene/`` that names it, and no
module imports this one."""
import sys

from productscene_cli import main

sys.exit(main())
