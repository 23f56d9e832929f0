"""Initialization of the depthwise + pointwise factors.

`lowrank` holds the data-free math (per-input-channel truncated SVD); later stages (calibration,
distillation) start from it.
"""
