"""``dwsep-compile``: a thin shell over `dwsep_compiler.compile_model`.

Ranks: ``--rank``, ``--energy``, ``--macs-ratio`` or ``--max-error`` (at most one); with none,
``--energy 0.95``. ``--calibration`` adds sequential layer-wise distillation of every factorized
layer on real inputs; without it the factors are data-free SVD and the report warns.

Errors the user can act on print one line on stderr and exit 2; anything unexpected prints one
line and exits 1 (set DWSEP_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

PROG = "dwsep-compile"


def _rank(text: str):
    if text == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be a positive integer or 'full', not {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"rank must be >= 1, not {value}")
    return value


def checked(what: str, cast, ok, rule: str):
    """An argparse type: ``cast`` the text, then require ``ok(value)`` ("<what> must be <rule>")."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be {rule}, not {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{what} must be {rule}, not {value}")
        return value
    return parse


def fraction(what: str):
    return checked(what, float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def positive(what: str):
    return checked(what, float, lambda v: v > 0.0, "a number > 0")


def count(what: str):
    return checked(what, int, lambda v: v >= 0, "an integer >= 0")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line and exit 2 (argparse prints the whole usage otherwise)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Replace standard convolutions by depthwise + pointwise pairs and compile "
                    "the model with Apache TVM.")
    parser.add_argument("model", nargs="?", help="input ONNX model (never modified)")
    parser.add_argument("--target", default="host",
                        help="preset name (see --list-targets) or a JSON TVM target dict "
                             "[default: host]")
    parser.add_argument("-o", "--output", help="output directory [default: ./<model stem>.dwsep]")
    ranks = parser.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=_rank,
                       help="depth multiplier r for every layer: an integer, or 'full' (exact)")
    ranks.add_argument("--energy", type=fraction("energy"),
                       help="per layer, the smallest r keeping this fraction of the squared "
                            "singular values [default when no rank flag: 0.95]")
    ranks.add_argument("--macs-ratio", type=fraction("macs ratio"), metavar="F",
                       help="allocate ranks across layers so that conv MACs <= F x original "
                            "with the least error (output error on --calibration data, else "
                            "SVD weight error)")
    ranks.add_argument("--max-error", type=positive("max error"), metavar="E",
                       help="per layer, the smallest rank whose relative error is <= E (output "
                            "error on --calibration data, else weight error); layers that "
                            "cannot reach it are kept")
    parser.add_argument("--calibration", metavar="FILE.npz|DIR",
                        help="real inputs (.npz keyed by input name, first axis = samples; or a "
                             ".npy, or a directory of them): distill every factorized layer "
                             "against the original model by least squares. Without it the "
                             "factors are data-free SVD, which can ruin trained models")
    parser.add_argument("--teacher", choices=("original", "local"), default="original",
                        help="distillation target: the original model's layer output on the "
                             "original activations, or the original conv on the rewritten "
                             "model's activations [default: original]")
    parser.add_argument("--fit", choices=("post-activation", "linear"),
                        default="post-activation",
                        help="with --calibration: refit layers read by a ReLU-like activation "
                             "to match the teacher after it, or keep the pre-activation least "
                             "squares fit [default: post-activation]")
    parser.add_argument("--sensitivity", choices=("model-output", "layer"),
                        default="model-output",
                        help="with --calibration, what --macs-ratio/--max-error price a rank "
                             "by: the model outputs' error with that layer alone approximated, "
                             "or the layer's own output error [default: model-output]")
    parser.add_argument("--finetune-steps", type=count("finetune steps"), default=0, metavar="N",
                        help="after the layer-wise distillation, train the factorized layers end "
                             "to end against the original model for N Adam steps on the "
                             "--calibration data (needs PyTorch: pip install "
                             "'dwsep-compiler[finetune]') [default: 0]")
    parser.add_argument("--finetune-lr", type=positive("finetune lr"), default=1e-4,
                        metavar="LR", help="Adam learning rate of --finetune-steps "
                                           "[default: 0.0001]")
    tuning = parser.add_argument_group("tuning (CPU targets; MetaSchedule over our schedule spaces)")
    tuning.add_argument("--tune", action="store_true",
                        help="autotune the kernels on the device (needs --tuning-records); keeps "
                             "the original conv where DW+PW is not faster there")
    tuning.add_argument("--tuning-records", metavar="DIR",
                        help="MetaSchedule JSON database: applied to this build (no --tune "
                             "needed), appended by --tune, resumed after a crash")
    tuning.add_argument("--trials", type=count("trials"), default=400, metavar="N",
                        help="measurements in all, records included [400]")
    tuning.add_argument("--tune-minutes", type=positive("tune minutes"), metavar="M",
                        help="time budget for the search")
    tuning.add_argument("--rpc-tracker", metavar="HOST:PORT",
                        help="measure on the devices registered at this TVM RPC tracker")
    tuning.add_argument("--rpc-key", metavar="KEY", help="the devices' key at the tracker")
    parser.add_argument("--force-rewrite", action="store_true",
                        help="rewrite layers even where the rank would not cut MACs "
                             "(e.g. to check --rank full)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME|REGEX",
                        help="leave this conv alone: its name as in the report, or a regular "
                             "expression matched against whole names; repeatable")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                        help="fix an input's shape (needed for dynamic dims); repeatable")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw the rank allocation (--macs-ratio/--max-error): each "
                             "layer's MACs against its error by rank, chosen ranks marked")
    parser.add_argument("--no-factorize", action="store_true",
                        help="compile the model as given (already factorized, or a "
                             "hand-written MobileNet) with our schedules, tuning and checks")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="arithmetic inside the library: fp16 (float16 weights and "
                             "compute, float32 inputs and outputs) on ARMv8.2 cores "
                             "(arm-a55, arm-a76, arm-a78) [default: fp32]")
    parser.add_argument("--no-compile", action="store_true",
                        help="stop after the ONNX rewrite (no TVM build)")
    parser.add_argument("--cross-compiler", metavar="CMD",
                        help="linker for aarch64 targets [default: aarch64-linux-gnu-g++]")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not run the library against onnxruntime (a mismatch fails the "
                             "build otherwise)")
    parser.add_argument("--list-targets", action="store_true", help="print the target presets")
    parser.add_argument("-q", "--quiet", action="store_true", help="no table, only errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imports after parsing: --help and argument errors stay instant.
    from dwsep_compiler.errors import DwsepError
    from dwsep_compiler.interrupt import run_interruptible
    from dwsep_compiler.model import parse_input_shapes
    from dwsep_compiler.pipeline import NoEligibleConvs, compile_model
    from dwsep_compiler.targets import list_targets

    if args.list_targets:
        print(list_targets())
        return 0
    if not args.model:
        print(f"{PROG}: error: no model given (usage: {PROG} model.onnx --target arm)",
              file=sys.stderr)
        return 2
    tune = None
    if args.tune or args.rpc_tracker or args.rpc_key:
        if not args.tune:
            print(f"{PROG}: error: --rpc-tracker/--rpc-key are for --tune", file=sys.stderr)
            return 2
        if not args.tuning_records:
            print(f"{PROG}: error: --tune needs --tuning-records DIR (where measurements go)",
                  file=sys.stderr)
            return 2
        if args.trials < 1:
            print(f"{PROG}: error: --trials must be >= 1", file=sys.stderr)
            return 2
        from dwsep_compiler.tuning import TuneOptions

        tune = TuneOptions(records=args.tuning_records, trials=args.trials,
                           minutes=args.tune_minutes, rpc_tracker=args.rpc_tracker,
                           rpc_key=args.rpc_key, cross_compiler=args.cross_compiler,
                           progress=not args.quiet)
    if args.plot and args.macs_ratio is None and args.max_error is None:
        print(f"{PROG}: error: --plot draws the rank allocation: give --macs-ratio or "
              "--max-error", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - before the work, not after it
        except ImportError:
            print(f"{PROG}: error: --plot needs matplotlib: pip install "
                  "'dwsep-compiler[plot]'", file=sys.stderr)
            return 2
    say = (lambda message: None) if args.quiet else (
        lambda message: print(message, file=sys.stderr, flush=True))
    try:
        result = run_interruptible(lambda: compile_model(
            args.model, target=args.target, output_dir=args.output, rank=args.rank,
            energy=args.energy, force=args.force_rewrite, ignored_scope=args.skip,
            input_shapes=parse_input_shapes(args.input_shape), compile=not args.no_compile,
            cross_compiler=args.cross_compiler, verify=not args.no_verify, log=say,
            calibration=args.calibration, macs_ratio=args.macs_ratio, max_error=args.max_error,
            fit=args.fit, sensitivity=args.sensitivity,
            teacher=args.teacher, finetune_steps=args.finetune_steps,
            finetune_lr=args.finetune_lr, tune=tune,
            tuning_records=None if tune else args.tuning_records,
            factorize_convs=not args.no_factorize, precision=args.precision), PROG)
    except NoEligibleConvs as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except DwsepError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: still one line, unless asked for the traceback
        if os.environ.get("DWSEP_DEBUG"):
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"{PROG}: internal error: {type(exc).__name__}: {first} "
              "(set DWSEP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    if args.plot:
        from dwsep_compiler.plot import allocation_plot

        try:
            allocation_plot(result.report, args.plot)
        except (DwsepError, OSError) as exc:
            print(f"{PROG}: error: --plot: {exc}", file=sys.stderr)
            return 2
        say(f"plotted the rank allocation: {args.plot}")
    if not args.quiet:
        print(result.table())
        checked = result.report.verification
        if checked and checked.get("ran"):
            print(f"verified on {checked['ran']}: library vs onnxruntime on "
                  f"{len(checked['inputs'])} inputs, max relative error "
                  f"{checked['max_rel_error']:.2e} (tolerance {checked['tolerance']:.0e})")
        elif checked:
            print(f"not verified: {checked['skipped']}")
        if result.library is not None and result.library.note:
            print(f"library: {result.library.path}: {result.library.note}")
        print(f"wrote {result.output_dir}/ ({', '.join(sorted(os.listdir(result.output_dir)))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
