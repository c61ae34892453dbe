"""Make torchvision importable beside a torch build it was not compiled for.

PyPI has one torchvision wheel per torch release, built against CUDA torch. Beside the CPU build of the same torch
release its C extension cannot load (it links libtorch_cuda), which torchvision tolerates, except that its
`_meta_registrations` registers fake kernels for `torchvision::nms` / `qnms` unconditionally and then fails with
"operator torchvision::nms does not exist". timm needs only torchvision's Python transforms, and transformers
imports torchvision whenever it is installed, so that one failure breaks both.

`install()` adds an import hook that, when torchvision is first imported, loads its C extension itself and, only
if that fails, defines the two operator schemas (no kernels: calling them still fails, as it would without the
extension) so the registrations succeed. Nothing of torchvision's code is changed; where the extension loads (a
matching build, the GPU machine) the hook does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from typing import Any

# The schemas of torchvision's csrc/ops/nms.cpp and csrc/ops/quantized/qnms.cpp (identical signatures).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list[Any] = []  # a torch.library.Library must stay alive for its definitions to stay


def _prepare_torchvision(package_dir: Path) -> None:
    import torch

    extension = next(iter(sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))), None)
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))
            return
        except OSError:
            pass
    if hasattr(torch.ops.torchvision, "nms") or _libraries:
        return
    library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive in _libraries
    for schema in _SCHEMAS:
        library.define(schema)
    _libraries.append(library)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs _prepare_torchvision right before the torchvision package is executed (once)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.submodule_search_locations:
            _prepare_torchvision(Path(next(iter(spec.submodule_search_locations))))
        return spec


def install() -> None:
    """Install the hook (idempotent; a no-op once torchvision is imported)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())
