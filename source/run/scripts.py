"""An entry script as a module, for the code that reuses one without running it.

The scripts' file names (``fine-tuning.py``, ``ssl_pre-training.py``) are not valid module names,
so ``import`` cannot reach them; tests read their parsers and loaders, and
``experiments/bissl_ablation.py`` reuses ``demo.py``'s stage sizes. Nothing in ``source/`` calls
this: the package never imports an entry script.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: str | Path) -> ModuleType:
    """Execute the script at ``path`` as a fresh module named after it (``fine-tuning.py`` ->
    ``fine_tuning``) and return it; its ``if __name__ == "__main__":`` block does not run.

    Each call executes the file again, so a caller may patch the module it gets freely. The module
    is registered in ``sys.modules`` while it executes, as an import would (dataclasses and pickle
    look their module up there)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no script at {path}")
    name = path.name.removesuffix(".py").replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
