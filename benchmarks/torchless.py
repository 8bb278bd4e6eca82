"""Run a process as jpeft's own install sees the world: without torch.

torch is a test and reference dependency here (HF PEFT's side of each comparison), never one of jpeft's; but
once it is importable, transformers imports it (~250 MB resident) with its first configuration class. A
worker measuring jpeft's memory calls `hide()` first, so that figure is jpeft's, as a user's install has it.
"""

from __future__ import annotations

import importlib.util
import sys


def hide() -> None:
    """Make torch unimportable in this process; call before anything imports transformers."""
    if "torch" in sys.modules and sys.modules["torch"] is not None:
        raise RuntimeError("torch is already imported: hide() must run before transformers is imported")
    find_spec = importlib.util.find_spec

    def torchless_find_spec(name: str, package: str | None = None):
        return None if name.partition(".")[0] == "torch" else find_spec(name, package)

    importlib.util.find_spec = torchless_find_spec  # how transformers asks whether torch is installed
    sys.modules["torch"] = None  # and `import torch` raises ImportError
