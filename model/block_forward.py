"""Give one module a different forward without wrapping it: its class becomes a cached subclass of its class
whose forward is made from the parent's (recompute in model/recompute.py, torch.compile in model/compile.py).

Wrapping (torch's checkpoint_wrapper, OptimizedModule) renames parameters (`_checkpoint_wrapped_module.`,
`_orig_mod.`), which checkpoints, outlier hooks and Hugging Face names would all see; replacing the bound
`forward` on the instance breaks deep copies (the copy would call the original's method). A subclass keeps
names, state dicts, isinstance and deep copies, and one compiled forward serves every block of a class.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

_SUBCLASSES: dict[tuple[type, str], type] = {}


def with_forward(module: nn.Module, tag: str, make_forward: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Make `module` an instance of `<tag><its class>`, whose forward is make_forward(its class's forward).
    Applying the same tag twice does nothing."""
    cls = type(module)
    if cls.__name__.startswith(tag):
        return
    key = (cls, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{tag}{cls.__name__}", (cls,),
                                {"forward": make_forward(cls.forward), "__module__": cls.__module__})
    module.__class__ = _SUBCLASSES[key]
