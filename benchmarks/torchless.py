"""Run a process as jpeft's own install sees the world: without torch.

torch is a test and reference dependency here (HF PEFT's side of each comparison), never one of jpeft's; but
once it is importable, transformers imports it (~250 MB resident) with its first configuration class. A
worker measuring jpeft's memory calls `hide()` first, so that figure is jpeft's, as a user's install has it.
"""

from __future__ import annotations

import sys


def hide() -> None:
    """Make torch unimportable in this process; call before anything imports transformers."""
    if sys.modules.get("torch") is not None:
        raise RuntimeError("torch is already imported: hide() must run before transformers is imported")
    sys.modules["torch"] = None  # `import torch` raises ImportError and importlib.util.find_spec("torch") gives None
