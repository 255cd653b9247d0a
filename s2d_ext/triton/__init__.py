"""Triton kernels of the s2d ops, each registered as a torch custom op ``torch.ops.s2d.<op>_triton``."""
