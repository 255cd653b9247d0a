"""compute: the dtype and kernels a run uses by default on a CPU with and without native bfloat16, the one
warning for bfloat16 with torch's kernels where it is slow, and applying the kernels to a model."""

from __future__ import annotations

import warnings

import pytest
import torch

from python_tests.driver.tiny_models import make_target
from s2d_ext import compute
from s2d_ext.row_invariant import uses_row_invariant_kernels


@pytest.mark.parametrize("native", [True, False])
def test_defaults_on_a_cpu(monkeypatch, native):
    monkeypatch.setattr(compute, "native_bfloat16", lambda device: native)
    monkeypatch.setattr(compute, "default_kernels", lambda device: "invariant")
    dtype, kernels, line = compute.choose("cpu")
    assert (dtype, kernels) == (torch.bfloat16, "invariant") and "bfloat16" in line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dtype, _, line = compute.choose("cpu", kernels="torch")
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert "torch" in line


def test_bfloat16_with_torch_kernels_warns_only_without_native_support(monkeypatch):
    monkeypatch.setattr(compute, "native_bfloat16", lambda device: False)
    with pytest.warns(RuntimeWarning, match="no AVX512-BF16 / AMX"):
        compute.choose("cpu", torch.bfloat16, "torch")
    monkeypatch.setattr(compute, "native_bfloat16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute.choose("cpu", torch.bfloat16, "torch")
        compute.choose("cpu", torch.float32, "torch")


def test_apply_kernels_and_bad_input():
    model = make_target("llama")
    assert uses_row_invariant_kernels(compute.apply_kernels(model, "invariant"))
    assert not uses_row_invariant_kernels(compute.apply_kernels(model, "torch"))
    with pytest.raises(ValueError, match="kernels must be one of"):
        compute.choose("cpu", kernels="fast")
    with pytest.raises(ValueError, match="kernels must be one of"):
        compute.apply_kernels(model, "fast")
