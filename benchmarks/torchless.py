"""Run a process as jpeft's own install sees the world: without torch.

torch is a test and reference dependency here (HF PEFT's side of each comparison), never one of jpeft's; but
once it is importable, transformers imports it (~250 MB resident) with its first configuration class. A
worker measuring jpeft's memory calls `hide()` first, so that figure is jpeft's, as a user's install has it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by benchmarks.torchless)", name=name)
        return None


def hide() -> None:
    """Make torch look uninstalled in this process; call before anything imports transformers.

    `import torch` raises ModuleNotFoundError and `importlib.util.find_spec("torch")` (how transformers asks) gives
    None, while `"torch" in sys.modules` stays False (a None there breaks libraries that probe it, e.g. scipy).
    """
    if "torch" in sys.modules:
        raise RuntimeError("torch is already imported: hide() must run before transformers is imported")
    sys.meta_path.insert(0, _NoTorch())
    find_spec = importlib.util.find_spec

    def torchless_find_spec(name: str, package: str | None = None):
        return None if name.partition(".")[0] == "torch" else find_spec(name, package)

    importlib.util.find_spec = torchless_find_spec
