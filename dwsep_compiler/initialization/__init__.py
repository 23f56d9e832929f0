"""Initialization of the depthwise + pointwise factors.

* `lowrank`: the data-free math (per-input-channel truncated SVD), the starting point;
* `ranks`: `RankPolicy`, one rank per layer from its singular values (``--rank``/``--energy``);
* `allocation`: ranks across layers from error-vs-rank curves (``--macs-ratio``/``--max-error``);
* `distill`: the least-squares refit on calibration statistics (Gram matrices, ridge solves,
  alternating least squares), pure numpy;
* `calibration`: calibration data loading and the onnxruntime-driven sequential distillation;
* `finetune`: end-to-end fine-tuning of the factorized layers (PyTorch, optional);
* `stage`: the stage `compile_model` runs: option checks, ranks, rewrite, initialization.
"""
