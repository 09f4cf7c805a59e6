"""A tiny open_clip architecture for the scorer tests (random weights, fast on a CPU).

Imported by the tests; run as a script (``python tests/scorefixtures.py pseudo-labels ...``,
also under torchrun) it registers the architecture and runs the ``spl`` command, so that
subprocesses know it too.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

TINY = "spl-tiny-clip"
TINY_SIZE = 32  # the architecture's own input size
TINY_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {
        "image_size": TINY_SIZE,
        "layers": 2,
        "width": 48,
        "patch_size": 8,
        "head_width": 16,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register() -> str:
    """Make ``TINY`` an open_clip architecture in this process; return its name."""
    import open_clip

    if TINY not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="spl-tiny-clip-"))
        (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(folder / f"{TINY}.json")
    return TINY


if __name__ == "__main__":
    register()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from spl.cli import main

    sys.exit(main())
