"""spl: multi-label image classifiers from single positive labels (Cole et al., CVPR 2021)."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout the stage folders (data/, extract/, fit/, evaluate/) sit beside this
# one; an installed wheel places them inside spl/. When this package is imported straight
# from the checkout (``python -m spl`` run from the repository root shadows the installed
# finder), look for the stages one level up too so ``spl.data`` resolves either way.
_here = Path(__file__).resolve().parent
if not (_here / "data").is_dir() and (_here.parent / "data" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (module __path__ exists for packages)
