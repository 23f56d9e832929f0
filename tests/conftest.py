"""Shared fixtures. Models are built in-process with onnx.helper; nothing is downloaded."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import small_cnn

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Caches the tests own (aarch64 root and wheels, PoCL kernels): git-ignored, reused across runs.
os.environ.setdefault("DWSEP_CACHE_DIR", str(ROOT / ".cache"))
os.environ.setdefault("POCL_CACHE_DIR", str(ROOT / ".cache" / "pocl"))
os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".cache" / "xdg"))


# The unit loop (`pytest -m unit`, ~25 s on 2 cores): tests that build no library, run no
# qemu, PoCL or RPC server: the rewrite, the factorization math, the torch executor, the block
# names passes and rules share, the layout and packaging rules.
UNIT = ("rewrite/", "initialization/test_lowrank.py", "initialization/test_post_activation.py",
        "initialization/test_torch_ops.py", "compile/test_block_names.py", "test_layout.py",
        "test_packaging.py")


def pytest_collection_modifyitems(config, items):
    tests = pathlib.Path(__file__).resolve().parent
    for item in items:
        where = pathlib.Path(str(item.fspath)).resolve().relative_to(tests).as_posix()
        if where.startswith(UNIT):
            item.add_marker(pytest.mark.unit)


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: the fast loop (no builds, no emulators)")
    config.addinivalue_line("markers", "emulation: runs aarch64 artifacts under qemu-user")
    config.addinivalue_line("markers", "opencl: runs OpenCL kernels on PoCL")
    config.addinivalue_line("markers", "rpc: uses a TVM RPC tracker and servers on 127.0.0.1")


@pytest.fixture(scope="session")
def runtime():
    """The aarch64 Python root qemu runs libraries in (built once into $DWSEP_CACHE_DIR)."""
    from dwsep_compiler.device import aarch64_root
    from dwsep_compiler.errors import DwsepError

    try:
        return aarch64_root.ensure_aarch64_runtime()
    except DwsepError as exc:
        pytest.fail(f"aarch64 emulation unavailable: {exc} (tests/run.sh installs the tools)",
                    pytrace=False)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "cnn.onnx"
    onnx.save(small_cnn(np.random.default_rng(0)), path)
    return path
