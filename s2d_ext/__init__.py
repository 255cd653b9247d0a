"""s2d_ext: sorted speculative decoding (S2D, arXiv 2407.01955) for Hugging Face models."""

from s2d_ext import ops
from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.generate import generate
from s2d_ext.speculate import SpeculateOutput, speculate
from s2d_ext.speculator import Speculator

__version__ = "0.1.0"
__all__ = ["SortedDraft", "SpeculateOutput", "Speculator", "generate", "ops", "speculate"]
