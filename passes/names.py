"""Block and PrimFunc names that the lowering passes emit and the schedule rules match on.

A rule recognizes a PrimFunc by its blocks' names and iterator kinds; a pass that renamed a
block would leave its PrimFunc to the fallback rule without an error, so both sides take the
names from here (tests/compile/test_block_names.py checks that every block a lowering pass
emits is claimed by a rule under its name).
"""

# TOPI's names for what legalization makes of a conv2d: the padding stage and the conv block.
# Our passes reuse PAD so that one finder reads both.
PAD = "pad_temp"
CONV2D = "conv2d_nchw"
GROUP_CONV2D = "group_conv2d_nchw"

# `lowering.pack_weights`: a conv over weights packed in vector blocks of output channels
# (its PrimFunc and its compute block); `schedules.cpu.packed` claims it.
PACKED_CONV = "conv2d_packed"

# `lowering.pack_dense`: a matmul over a weight packed in tiles of rows by columns (its
# PrimFunc and its compute block); `schedules.cpu.dense` claims it, like TOPI's ``matmul``.
PACKED_DENSE = "matmul_packed"

# `lowering.fuse_dwpw`: one PrimFunc computing a depthwise conv and the pointwise conv reading
# it; `schedules.cpu.fused_dwpw` and `schedules.gpu.fused_dwpw` claim it.
FUSED_DWPW = "fused_depthwise_pointwise"
FUSED_DEPTHWISE = "depthwise"
FUSED_POINTWISE = "pointwise"
