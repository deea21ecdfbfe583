"""Keep the node translations in locales/ in step with the nodes (devkit/locales.py says how).

    .venv/bin/python scripts/update_locales.py          # rewrite locales/en/nodeDefs.json, list gaps
    .venv/bin/python scripts/update_locales.py --check  # exit 1 if en is stale or a language has gaps
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.locales import main  # noqa: E402

sys.exit(main())
