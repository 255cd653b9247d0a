"""The s2d ops: each a thin validated wrapper over ``torch.ops.s2d.*`` and its torch reference."""

from s2d_ext.ops._backend import available_backends
from s2d_ext.ops.verify import verify

__all__ = ["available_backends", "verify"]
