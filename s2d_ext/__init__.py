"""s2d_ext: sorted speculative decoding (S2D, arXiv 2407.01955) for Hugging Face models.

Top-level names load on first use (``import s2d_ext`` imports neither torch nor transformers), so the
``s2d`` command starts fast. NOTE: no submodule of this package is named like a public function
(``speculate``, ``generate``): importing such a submodule would replace the function attribute.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> (module, attribute); None attribute = the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "ops": ("s2d_ext.ops", None),
    "SortedDraft": ("s2d_ext.draft.sorted_draft", "SortedDraft"),
    "Engine": ("s2d_ext.engine.engine", "Engine"),
    "RequestOutput": ("s2d_ext.engine.engine", "RequestOutput"),
    "SamplingParams": ("s2d_ext.engine.params", "SamplingParams"),
    "TargetConfig": ("s2d_ext.engine.models", "TargetConfig"),
    "SpeculateOutput": ("s2d_ext.driver.batch", "SpeculateOutput"),
    "speculate": ("s2d_ext.driver.speculation", "speculate"),
    "Speculator": ("s2d_ext.driver.speculator", "Speculator"),
    "generate": ("s2d_ext.driver.hf_hook", "generate"),
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 's2d_ext' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # NOTE: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
