"""Fixtures of the OpenCL tests: the PoCL context and two small models (a CNN and its rank-2
rewrite); the cached GPU builds are in gpu_builds.py."""

from __future__ import annotations

import numpy as np
import pytest

from dwsep_compiler.device import pocl
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.passes.rewrite.onnx_factorize import factorize_onnx

from gpu_builds import SHAPE
from helpers import small_cnn


@pytest.fixture(scope="module")
def cl_context():
    try:
        import pyopencl  # noqa: F401
    except ImportError:
        pytest.fail("pyopencl is missing: pip install pyopencl (or '.[test]')")
    try:
        return pocl.pocl_context()
    except pocl.OpenCLUnavailable as exc:
        pytest.fail(f"no PoCL OpenCL platform: {exc}")


@pytest.fixture(scope="module")
def models():
    plain = small_cnn(np.random.default_rng(0))
    factorized = factorize_onnx(plain, {"x": SHAPE}, RankPolicy(rank=2))
    assert [layer.status for layer in factorized.layers][:2] == ["factorized", "factorized"]
    return {"cnn": plain, "cnn_rank2": factorized.model}


