"""Make `import torchvision` (and so timm, and transformers' model classes) work where torchvision's C++ ops
cannot load.

PyPI's Linux torchvision wheels are CUDA builds: next to torch's CPU build (this project's torch==2.13.0+cpu)
their `_C.so` cannot load (it links libtorch_cuda). torchvision then skips its ops but still registers fake
kernels for `torchvision::nms` / `qnms`, which fails because those operators were never defined, so the whole
import fails. Once torchvision is installed, transformers imports it too (image utilities, for every model
class), so every transformers model would fail to load. Nothing here needs those detection ops (timm's
transforms are Python + PIL), so when the library cannot load, the two schemas are declared before
torchvision is first imported; where `_C.so` loads (a matching CUDA or CPU build) nothing is done.

Two ways in: `ensure_torchvision_importable()` (called before timm is imported here), and for every process of
the environment (transformers imported first, subprocesses without this project) a `.pth` start-up line that
`python -m model.vit.torchvision_compat --install` writes into site-packages (`make install` runs it). The
line only registers an import hook; torch is imported when, and only if, torchvision is.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "outeffhop_torchvision_cpu_fix.pth"

# Self-contained (runs from the .pth without this project on the path): declare the schemas if _C cannot load.
FIX_SOURCE = '''
def _outeffhop_declare_torchvision_ops():
    import importlib.util, sys, types
    from pathlib import Path
    if "_outeffhop_torchvision_ops" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch
    extension = next(Path(spec.origin).parent.glob("_C*.so"), None)
    try:
        if extension is not None:
            torch.ops.load_library(str(extension))
            return
    except OSError:
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "DEF")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        library.define(schema)
    holder = types.ModuleType("_outeffhop_torchvision_ops")  # keeps the library (and the schemas) alive
    holder.library = library
    sys.modules[holder.__name__] = holder
'''

HOOK_SOURCE = FIX_SOURCE + '''
class _OutEffHopTorchvisionHook:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            import sys
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                _outeffhop_declare_torchvision_ops()
            except Exception:
                pass
        return None

import sys as _sys
if "torchvision" not in _sys.modules and not any(type(f).__name__ == "_OutEffHopTorchvisionHook"
                                                 for f in _sys.meta_path):
    _sys.meta_path.insert(0, _OutEffHopTorchvisionHook())
'''

_namespace: dict[str, object] = {}
exec(FIX_SOURCE, _namespace)  # one definition for the in-process call and the start-up hook


def ensure_torchvision_importable() -> None:
    """Declare torchvision's detection-op schemas if its library cannot load (before it is first imported)."""
    if "torchvision" not in sys.modules:
        _namespace["_outeffhop_declare_torchvision_ops"]()  # type: ignore[operator]


def install_startup_hook(site_packages: Path | None = None) -> Path:
    """Write the .pth start-up line into site-packages (idempotent); returns its path."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    # A fresh globals dict: site.py runs .pth lines with exec, whose locals the hook's methods could not see.
    target.write_text(f"import sys; exec({HOOK_SOURCE!r}, {{'__name__': 'outeffhop_torchvision_cpu_fix'}})\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="write the .pth start-up hook into site-packages")
    args = parser.parse_args()
    if args.install:
        print(f"wrote {install_startup_hook()}")


if __name__ == "__main__":
    main()
