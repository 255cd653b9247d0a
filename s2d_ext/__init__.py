"""s2d_ext: sorted speculative decoding (S2D, arXiv 2407.01955) for Hugging Face models."""

from s2d_ext import ops
from s2d_ext.draft.sorted_draft import SortedDraft

__version__ = "0.1.0"
__all__ = ["SortedDraft", "ops"]
