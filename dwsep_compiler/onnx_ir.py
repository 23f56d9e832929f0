"""The factorization as an onnx_ir pass, to chain with onnxscript's passes:

    import onnx_ir as ir
    from onnxscript.optimizer import ...
    from dwsep_compiler.onnx_ir import FactorizePass

    manager = ir.passes.PassManager([FactorizePass(macs_ratio=0.4, calibration=feeds), ...])
    result = manager(model)

A `FunctionalPass`: the input model is left as it was and a new one comes back (the rewrite and
its initialization work on ONNX protos: `dwsep_compiler.factorize`). Needs the ``onnx-ir``
package (the ``pipelines`` extra).
"""

from __future__ import annotations

import onnx_ir as ir

from dwsep_compiler.pipeline import factorize
from dwsep_compiler.report import Report


class FactorizePass(ir.passes.FunctionalPass):
    """`dwsep_compiler.factorize` with these keyword options (rank, energy, macs_ratio,
    max_error, calibration, ignored_scope, ...). After a call, `report` is that model's
    report: each conv's rank, or the reason it was kept."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options
        self.report: Report | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        factorized, self.report = factorize(model, **self.options)
        return ir.passes.PassResult(ir.serde.deserialize_model(factorized),
                                    modified=bool(self.report.factorized_layers))
