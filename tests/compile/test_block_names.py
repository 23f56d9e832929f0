"""The lowering passes and the schedule rules agree on block names (`passes/names.py`).

A rule recognizes the PrimFuncs our passes build by their blocks' names; a pass that renamed a
block, or emitted one no rule knows, would leave its kernel to the slow fallback without any
error. Here every PrimFunc the passes emit, for a model that makes each of them fire, must be
claimed by the rule meant for it, and every block in it must carry a name from `names`."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import s_tir, tirx

from dwsep_compiler.compile import cpu as cpu_build
from dwsep_compiler.compile import import_onnx
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.passes import names
from dwsep_compiler.passes.rewrite.onnx_factorize import factorize_onnx
from dwsep_compiler.schedules import cpu as cpu_rules
from dwsep_compiler.schedules import gpu as gpu_rules
from dwsep_compiler.schedules.apply import first_rule
from dwsep_compiler.targets import resolve_target

from helpers import make_model

# PrimFunc made by a lowering pass -> the CPU rules meant to claim it (packed weights: the
# standard conv rule for kxk kernels, the pointwise rule for 1x1; packed dense weights: NEON
# only)
EXPECTED = {names.FUSED_DWPW: {"FusedDepthwisePointwise"},
            names.PACKED_CONV: {"Conv2D", "Pointwise"},
            names.PACKED_DENSE: {"Dense"}}
NEON_ONLY = {names.PACKED_DENSE}
KNOWN_BLOCKS = {names.PAD, names.PACKED_CONV, names.FUSED_DEPTHWISE, names.FUSED_POINTWISE,
                names.PACKED_DENSE}


def _model():
    """x (1, 8, 16, 16) -> 3x3 conv (factorized: a DW+PW pair, fused) -> relu -> 3x3 conv on a
    7-pixel-wide map (rows are not whole vectors: packed weights) -> 1x1 conv (packed) ->
    flatten -> Gemm (packed on NEON)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 8, 3, 3)), ("w2", (16, 16, 3, 3)), ("w3", (16, 16, 1, 1)),
                          ("w4", (16, 16 * 8 * 7)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Slice", ["p1", "s", "e", "a"], ["q1"]),
             helper.make_node("Conv", ["q1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
             helper.make_node("Flatten", ["c3"], ["f3"]),
             helper.make_node("Gemm", ["f3", "w4"], ["y"], transB=1)]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("s", [0]), ("e", [7]), ("a", [3]))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return factorize_onnx(model, {"x": (1, 8, 16, 16)},
                          RankPolicy(rank=1, force=True), skip={"conv2", "conv3"}).model


def _legalized(target):
    front, _, _ = cpu_build.stages(target, fuse="always")
    with target, tvm.transform.PassContext(opt_level=3, config=cpu_build.PASS_CONFIG):
        return tvm.transform.Sequential(front)(import_onnx(_model(), {"x": (1, 8, 16, 16)}))


def _ours(mod) -> dict[str, tirx.PrimFunc]:
    return {gv.name_hint: func for gv, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc) and any(p in gv.name_hint for p in EXPECTED)}


def _block_names(func: tirx.PrimFunc) -> list[str]:
    sch = s_tir.Schedule(func)
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


@pytest.mark.parametrize("preset", ["host", "arm-a76"])
def test_every_block_a_lowering_pass_emits_is_claimed_by_name(preset):
    target = resolve_target(preset).tvm_target()
    ours = _ours(_legalized(target))
    kinds = {prefix for prefix in EXPECTED for name in ours if prefix in name}
    fired = set(EXPECTED) - (set() if preset.startswith("arm") else NEON_ONLY)
    assert kinds == fired, sorted(ours)  # the model makes every pass fire
    for name, func in ours.items():
        prefix = next(p for p in EXPECTED if p in name)  # fusion renames: fused_<ours>_relu
        compute = [b for b in _block_names(func) if not b.startswith("T_") and b != "compute"]
        assert set(compute) <= KNOWN_BLOCKS, (name, compute)
        rule, _ = first_rule(cpu_rules.rules(), func, target)
        assert type(rule).__name__ in EXPECTED[prefix], (name, type(rule).__name__)


def test_the_gpu_rules_claim_the_fused_kernel_by_name():
    target = resolve_target("mali").tvm_target()
    fused = {n: f for n, f in _ours(_legalized(resolve_target("host").tvm_target())).items()
             if names.FUSED_DWPW in n}
    assert fused
    for name, func in fused.items():
        claimed = first_rule(gpu_rules.rules(), func, target)
        assert claimed is not None and type(claimed[0]).__name__ == "FusedDepthwisePointwise", name
