"""The factorization as an Olive pass, ``DwsepFactorize``, for Olive workflows:

    "passes": {"factorize": {"type": "DwsepFactorize", "macs_ratio": 0.4, "data_config": "calib"},
               "quantize": {"type": "OnnxStaticQuantization", ...}}

Olive finds third-party passes only through a package config given to ``olive run
--package-config FILE``, and that file replaces Olive's own, so it must hold Olive's passes
too: ``python -m dwsep_compiler.olive package-config -o FILE`` writes Olive's default package
config with our pass added. ``data_config`` names an Olive data config; its dataloader's
batches are the calibration feeds (``(inputs, labels)`` batches, inputs a dict or a tensor).
The pass writes the factorized model and, beside it, ``dwsep_report.json``. Needs olive-ai
(the ``olive`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Union

from olive.common.config_utils import validate_config
from olive.data.config import DataConfig
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from dwsep_compiler.pipeline import factorize

PASS_NAME = "DwsepFactorize"
REPORT_NAME = "dwsep_report.json"


class DwsepFactorize(Pass):
    """Replace standard convolutions by depthwise + pointwise pairs (`dwsep_compiler.factorize`
    with these options)."""

    @classmethod
    def _default_config(cls, accelerator_spec) -> dict[str, PassConfigParam]:
        return {
            "rank": PassConfigParam(type_=Optional[Union[int, str]], default_value=None,
                                    description="depth multiplier of every layer, or 'full'"),
            "energy": PassConfigParam(type_=Optional[float], default_value=None,
                                      description="per layer, the fraction of the squared "
                                                  "singular values kept"),
            "macs_ratio": PassConfigParam(type_=Optional[float], default_value=None,
                                          description="conv MACs at most this x the original, "
                                                      "ranks allocated across layers"),
            "max_error": PassConfigParam(type_=Optional[float], default_value=None,
                                         description="per layer, the smallest rank within "
                                                     "this relative error"),
            "ignored_scope": PassConfigParam(type_=list[str], default_value=[],
                                             description="convs to keep: names or regexes"),
            "data_config": PassConfigParam(type_=Optional[Union[DataConfig, dict]],
                                           default_value=None,
                                           description="calibration data (distills every "
                                                       "layer); without it the data-free SVD"),
            **get_external_data_config(),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        calibration = None
        if config.data_config:
            data = validate_config(config.data_config, DataConfig)
            calibration = data.to_data_container().create_dataloader()
        factorized, report = factorize(
            model.model_path, rank=config.rank, energy=config.energy,
            macs_ratio=config.macs_ratio, max_error=config.max_error,
            calibration=calibration, ignored_scope=list(config.ignored_scope))
        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        handler = model_proto_to_olive_model(factorized, output_model_path, config)
        with open(os.path.join(os.path.dirname(output_model_path), REPORT_NAME), "w") as out:
            out.write(report.to_json())
        return handler


def package_config() -> dict:
    """Olive's default package config with ``DwsepFactorize`` added."""
    with open(OlivePackageConfig.get_default_config_path()) as handle:
        config = json.load(handle)
    config["passes"][PASS_NAME] = {
        "module_path": f"dwsep_compiler.olive.{DwsepFactorize.__name__}",
        "supported_providers": ["*"], "supported_accelerators": ["*"],
        "supported_precisions": ["*"], "supported_algorithms": [],
        "supported_quantization_encodings": []}
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dwsep_compiler.olive")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("package-config", help="write Olive's package config with our "
                                                       "pass, for olive run --package-config")
    write.add_argument("-o", "--output", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    target = os.path.abspath(args.output)
    if not os.path.isdir(os.path.dirname(target)):
        print(f"{parser.prog}: error: {os.path.dirname(target)} does not exist", file=sys.stderr)
        return 2
    config = package_config()
    partial = f"{target}.partial"
    with open(partial, "w") as handle:
        json.dump(config, handle, indent=2)
    os.replace(partial, target)
    print(f"wrote {target} (Olive's {len(config['passes']) - 1} passes and {PASS_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
