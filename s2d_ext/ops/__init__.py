"""The s2d ops: each a thin validated wrapper over ``torch.ops.s2d.*`` and its torch reference."""

from s2d_ext.ops._backend import available_backends
from s2d_ext.ops.exit_head import exit_head, exit_head_probs
from s2d_ext.ops.invariant_linear import invariant_linear
from s2d_ext.ops.kv_compact import kv_compact, kv_compact_layers
from s2d_ext.ops.verify import verify

__all__ = [
    "available_backends",
    "exit_head",
    "exit_head_probs",
    "invariant_linear",
    "kv_compact",
    "kv_compact_layers",
    "verify",
]
