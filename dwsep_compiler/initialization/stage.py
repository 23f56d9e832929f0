"""The initialization stage of `compile_model`: ranks, the rewrite, and the factors' values.

`FactorizeOptions.policy` checks the rank and calibration options before any work is done. An
`Initializer` chooses the ranks once (``--rank``/``--energy`` per layer from its singular values;
``--macs-ratio``/``--max-error`` across layers from error-vs-rank curves), then each
`Initializer.factorize` rewrites the ONNX model and sets every factorized layer's weights: the
data-free SVD, distilled layer by layer on calibration data when there is some, fine-tuned end to
end when asked. The latency gate of the tuning stage calls `factorize` a second time with the
layers it keeps as original convs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from dwsep_compiler.errors import DwsepError
from dwsep_compiler.macs import model_macs
from dwsep_compiler.model import view_model
from dwsep_compiler.passes.rewrite.conditions import plan_conv
from dwsep_compiler.passes.rewrite.onnx_factorize import OnnxFactorization, conv_sites, factorize_onnx
from dwsep_compiler.initialization import allocation
from dwsep_compiler.initialization.calibration import FITS, TEACHERS, CalibrationSet, distill_layers, rank_curves
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.initialization.sensitivity import OutputProbe, probe_plan

KEEP_ORIGINAL = 0  # the rank that tells plan_conv to keep the original conv
SENSITIVITIES = ("model-output", "layer")  # what --macs-ratio/--max-error price a rank by

FINETUNE_NEEDS_TORCH = ("--finetune-steps needs PyTorch: pip install 'dwsep-compiler[finetune]' "
                        "(torch==2.13.0)")


@dataclass(frozen=True)
class FactorizeOptions:
    """What to rewrite and how to initialize it: the options `factorize`, `compile_model`, the
    CLI and the integrations share, as one value the stages pass along (see `compile_model` for
    each one's meaning)."""

    rank: int | str | None = None
    energy: float | None = None
    macs_ratio: float | None = None
    max_error: float | None = None
    calibration: object = None  # a path or an iterable of feeds (`load_calibration`)
    ignored_scope: tuple[str, ...] = ()
    force: bool = False
    input_shapes: dict | None = None
    teacher: str = "original"
    fit: str = "post-activation"
    sensitivity: str = "model-output"
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    factorize: bool = True  # False: --no-factorize, compile the model as given

    def __post_init__(self):
        if isinstance(self.ignored_scope, str):
            object.__setattr__(self, "ignored_scope", (self.ignored_scope,))
        else:
            object.__setattr__(self, "ignored_scope", tuple(self.ignored_scope))

    def policy(self) -> RankPolicy:
        """The per-layer rank policy, after checking that the options make sense together
        (`DwsepError` otherwise). With ``factorize=False``: the policy that rewrites nothing
        (calibration data then only feeds the verification)."""
        chosen = [flag for flag, value in (("rank", self.rank), ("energy", self.energy),
                                           ("macs_ratio", self.macs_ratio),
                                           ("max_error", self.max_error))
                  if value is not None]
        if not self.factorize:
            given = chosen + [flag for flag, value in (("force", self.force),
                                                       ("finetune_steps", self.finetune_steps))
                              if value]
            if given:
                raise DwsepError(f"the factorization is off (--no-factorize): "
                                 f"{', '.join(given)} would not be used")
            return RankPolicy(off=True)
        if len(chosen) > 1:
            raise DwsepError(f"give at most one of rank, energy, macs_ratio, max_error "
                             f"(got {', '.join(chosen)})")
        if self.macs_ratio is not None and not 0.0 < self.macs_ratio <= 1.0:
            raise DwsepError(f"macs_ratio must be in (0, 1], got {self.macs_ratio}")
        if self.max_error is not None and not self.max_error > 0.0:
            raise DwsepError(f"max_error must be > 0, got {self.max_error}")
        for name, value, allowed in (("teacher", self.teacher, TEACHERS),
                                     ("fit", self.fit, FITS),
                                     ("sensitivity", self.sensitivity, SENSITIVITIES)):
            if value not in allowed:
                raise DwsepError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        _check_finetune(self.finetune_steps, self.finetune_lr, self.calibration)
        try:
            # The exact rewrite never cuts MACs: asking for it is asking to rewrite anyway.
            return RankPolicy(rank=self.rank, energy=self.energy,
                              force=self.force or self.rank == "full")
        except ValueError as exc:
            raise DwsepError(str(exc)) from None


def _check_finetune(steps: int, lr: float, calibration) -> None:
    """Fine-tuning options, the calibration data and PyTorch, before any work is done."""
    if not steps:
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise DwsepError(f"finetune_steps must be an integer >= 0, got {steps!r}")
    if not lr > 0.0:
        raise DwsepError(f"finetune_lr must be > 0, got {lr}")
    if calibration is None:
        raise DwsepError("--finetune-steps needs --calibration")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise DwsepError(FINETUNE_NEEDS_TORCH) from None


@dataclass
class Initializer:
    """Rewrites ``model`` and initializes its factors; one instance per `compile_model` call.

    ``options.policy()`` gives each layer its rank unless ``macs_ratio``/``max_error`` allocate ranks across
    layers (done once, here). ``calib``: the calibration set (None: data-free SVD)."""

    model: onnx.ModelProto
    shapes: dict[str, tuple[int, ...]]
    options: FactorizeOptions
    calib: CalibrationSet | None = None
    source: str = "the input model"  # for messages
    log: Callable[[str], None] = field(default=lambda message: None)

    def __post_init__(self):
        self.started = time.perf_counter()
        self.policy = self.options.policy()
        self.skip = frozenset()
        if self.options.ignored_scope:  # names the convs only when asked: a shape inference
            self.skip = resolve_scope(self.options.ignored_scope, [site.name for site in conv_sites(
                view_model(self.model, self.shapes))])
        self.policy_text = self.policy.describe()
        self.ranks: dict[str, int | None] | None = None
        self.allocation_info: dict | None = None
        self.distilled: dict = {}
        self.finetune_info: dict | None = None
        if self.options.macs_ratio is not None or self.options.max_error is not None:
            self.ranks, self.policy_text, self.allocation_info = allocate_ranks(
                self.model, self.shapes, self.skip, self.calib, self.options.macs_ratio,
                self.options.max_error, self.log, sensitivity=self.options.sensitivity)

    def initial_ranks(self) -> dict[str, int] | None:
        """The allocated ranks as `factorize` takes them (None: every layer by the policy)."""
        if self.ranks is None:
            return None
        return {name: KEEP_ORIGINAL if r is None else r for name, r in self.ranks.items()}

    def factorize(self, ranks: dict[str, int] | None) -> OnnxFactorization:
        """Rewrite with these per-layer ranks (`KEEP_ORIGINAL`: keep the conv) and initialize."""
        self.distilled.clear()
        self.finetune_info = None
        result = factorize_onnx(self.model, self.shapes, self.policy, self.skip, ranks,
                                refine=self._distill if self.calib is not None else None)
        if not result.layers and not self.policy.off:
            raise DwsepError(f"the model has no Conv nodes: nothing to factorize ({self.source})")
        for layer in result.layers:
            if self.ranks is not None and self.ranks.get(layer.name, 0) is None:
                layer.rank = None
                layer.detail = ("kept: no MAC-saving rank is within --max-error"
                                if self.options.max_error is not None else
                                "kept: the --macs-ratio allocation found this layer's error "
                                "costlier than its MACs")
        if self.options.finetune_steps and any(layer.factorized for layer in result.layers):
            from dwsep_compiler.initialization.finetune import finetune  # torch: imported only when asked for

            result.model, self.finetune_info = finetune(
                self.model, result.model, result.layers, self.calib, self.options.finetune_steps,
                self.options.finetune_lr, log=self.log)
        return result

    def _distill(self, view, sites, plans):
        self.log(f"distilling {sum(p.report.factorized for p in plans)} layers on "
                 f"{self.calib.used_samples} calibration samples ...")
        out = distill_layers(self.model, view, sites, plans, self.calib, teacher=self.options.teacher,
                             fit=self.options.fit, log=self.log)
        self.distilled.update(out.info)
        return out.sites, out.plans

    def calibration_report(self) -> dict | None:
        """The report's ``calibration`` section (None without calibration data)."""
        if self.calib is None:
            return None
        out = {"source": self.calib.source, "samples": self.calib.used_samples,
               "teacher": self.options.teacher, **self.distilled,
               "distill_time_s": self.distilled.get("time_s"),
               "time_s": round(time.perf_counter() - self.started, 3)}
        if self.finetune_info:
            out["finetune"] = self.finetune_info
        return out


def resolve_scope(entries, names: list[str]) -> frozenset[str]:
    """The conv names that ``entries`` select: each entry is a conv's report name or a regular
    expression matched against whole names. An entry selecting none is an error: a typo would
    otherwise factorize the layer the user meant to keep."""
    selected = set()
    for entry in entries:
        if entry in names:
            selected.add(entry)
            continue
        try:
            pattern = re.compile(entry)
        except re.error as exc:
            raise DwsepError(f"skip entry {entry!r} is no conv name and no valid regular "
                             f"expression ({exc})") from None
        matched = {name for name in names if pattern.fullmatch(name)}
        if not matched:
            raise DwsepError(f"skip entry {entry!r} matches no conv of the model (its convs: "
                             f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
        selected |= matched
    return frozenset(selected)


def allocate_ranks(model, shapes, skip, calib: CalibrationSet | None,
                   macs_ratio: float | None, max_error: float | None, log,
                   sensitivity: str = "model-output"):
    """Per-layer ranks for ``--macs-ratio`` / ``--max-error`` (None: keep the original conv),
    the report's policy text, and what the allocation measured.

    With calibration data, ``sensitivity="model-output"`` prices each (layer, rank) by the
    relative error of the model's outputs with that layer alone approximated
    (`sensitivity.OutputProbe`); ``"layer"`` by the layer's own output error."""
    if sensitivity not in SENSITIVITIES:
        raise DwsepError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, "
                         f"not {sensitivity!r}")
    view = view_model(model, shapes)
    sites = conv_sites(view)
    at_rank_1 = [plan_conv(site.spec, RankPolicy(rank=1), skip).report for site in sites]
    eligible = [site for site, report in zip(sites, at_rank_1) if report.factorized]
    by_output = calib is not None and sensitivity == "model-output"
    source = ("model output error on calibration data, one layer approximated at a time"
              if by_output else
              "calibration output error" if calib is not None else "SVD weight error")
    started = time.perf_counter()
    probe = None
    if calib is not None:
        log(f"measuring error by rank on {calib.used_samples} calibration samples ...")
        if by_output and eligible:
            samples, probed = probe_plan(model_macs(view), len(eligible), calib.used_samples)
            log(f"model-output sensitivity: {probed} ranks a layer on {samples} inputs")
            probe = OutputProbe(model, eligible, calib, samples=samples, ranks=probed)
        curves = list(rank_curves(model, view, eligible, calib, probe=probe, log=log).values())
    else:
        curves = [allocation.svd_curve(site.name, site.weight, site.spec.batch,
                                       site.spec.out_spatial) for site in eligible]
    info = {"error": source, "time_s": round(time.perf_counter() - started, 3),
            "curves": {c.name: {str(o.rank): round(o.error, 6) for o in c.options if o.rank}
                       for c in curves}}
    if by_output and probe is not None:
        info["sensitivity_probe"] = {"inputs": probe.samples, "ranks_per_layer": probe.ranks}
        info["sensitivity"] = {
            c.name: {"layer_error": {str(r): round(e, 6) for r, e in c.layer_errors.items()},
                     "model_output_error_measured": {str(r): round(e, 6)
                                                     for r, e in c.measured.items()}}
            for c in curves}
    if max_error is not None:
        ranks = allocation.ranks_within_error(curves, max_error)
        text = f"max_error={max_error} (per layer, {source})"
    else:
        total = sum(report.macs_before for report in at_rank_1)
        fixed = total - sum(curve.macs_before for curve in curves)
        budget = int(macs_ratio * total) - fixed
        if allocation.cheapest_macs(curves) > budget:
            least = (allocation.cheapest_macs(curves) + fixed) / total if total else 1.0
            raise DwsepError(f"--macs-ratio {macs_ratio} is out of reach: rank 1 on every "
                             f"eligible layer gives a conv MAC ratio of {least:.3f}")
        ranks = allocation.allocate_ranks(curves, budget)
        text = f"macs_ratio={macs_ratio} (greedy per-layer allocation, {source})"
    return ranks, text, info
