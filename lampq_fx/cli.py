"""The ``lampq`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lampq_fx.allocation.ilp import InfeasibleBudgetError, SolverError
from lampq_fx.analysis.layer_types import LayerType
from lampq_fx.analysis.tracing import TracingError
from lampq_fx.data import DataError
from lampq_fx.metrics.fisher import NonFiniteError
from lampq_fx.pipeline import REFERENCE_MODEL, RunConfig, run
from lampq_fx.report import format_table
from lampq_fx.strategies import strategy_names

logger = logging.getLogger("lampq_fx")


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(not 2 <= v <= 8 for v in values):
        raise argparse.ArgumentTypeError(f"bit-widths must be from 2 to 8, got {text!r}")
    return values


LAYER_TYPE_NAMES = [t.value for t in LayerType]


def _min_bits(text: str) -> dict[str, int]:
    bounds = {}
    for part in text.split(","):
        name, _, bits = part.partition("=")
        name = name.strip()
        if not bits.isdigit():
            raise argparse.ArgumentTypeError(f"expected TYPE=BITS pairs such as head=8, got {part!r}")
        if name not in LAYER_TYPE_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown layer type {name!r}; valid types: {', '.join(LAYER_TYPE_NAMES)}")
        if not 2 <= int(bits) <= 8:
            raise argparse.ArgumentTypeError(f"{name}={bits}: bit-widths must be from 2 to 8")
        bounds[name] = int(bits)
    return bounds


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lampq", description="Layer-wise mixed-precision "
                                     "quantization of Vision Transformers (LampQ) on torch.fx.")
    commands = parser.add_subparsers(dest="command", required=True)
    quantize = commands.add_parser(
        "quantize", help="allocate bits with LampQ and a baseline, evaluate, write the report",
        description="Without options: the embedded Fashion-MNIST ViT at budgets W4, W3 and "
                    "W4A4-equivalent BOPs, compared with uniform precision.")
    quantize.add_argument("--model", default=REFERENCE_MODEL, metavar="NAME",
                          help="timm model name, or 'reference' for the embedded Fashion-MNIST ViT (default)")
    quantize.add_argument("--checkpoint", type=Path, metavar="FILE", help="state-dict file with the model's weights")
    quantize.add_argument("--pretrained", action="store_true",
                          help="download timm's pretrained weights (needs network access)")
    quantize.add_argument("--data", type=Path, metavar="DIR",
                          help="ImageFolder directory with train/ and test/ (default for timm "
                               "models: Gaussian-noise calibration, no accuracy)")
    quantize.add_argument("--num-classes", type=_positive_int, metavar="N", help="classifier outputs for a timm model")
    quantize.add_argument("--img-size", type=_positive_int, metavar="PIXELS", help="input resolution in pixels for a timm model")

    quantize.add_argument("--budget", action="append", dest="budgets", metavar="BUDGET",
                          help="budget, repeatable: wbits=4 (average weight bits), mb=2.5 (model size "
                               "in MB), gbops=1.2 (giga bit-operations per image), or w4a4 (BOPs of "
                               "uniform W4A4, activation bits allocated too); default wbits=4, "
                               "wbits=3, w4a4")
    quantize.add_argument("--strategy", default="lampq", choices=strategy_names(), metavar="NAME",
                          help=f"allocation strategy: {', '.join(strategy_names())} (default lampq)")
    quantize.add_argument("--baseline", default="uniform", choices=[*strategy_names(), "none"],
                          metavar="NAME",
                          help="strategy to compare against at the same budget, or none "
                               "(default uniform)")
    quantize.add_argument("--weight-bits", type=_bits_list, default=(2, 3, 4, 5, 6, 8), metavar="BITS",
                          help="candidate weight bit-widths (default 2,3,4,5,6,8)")
    quantize.add_argument("--act-bits", type=_bits_list, default=(8,), metavar="BITS",
                          help="candidate activation bit-widths for wbits/mb/gbops budgets (default 8)")
    quantize.add_argument("--min-bits", type=_min_bits, default={}, metavar="TYPE=BITS,...",
                          help="per-type lower bounds on weight and activation bits, e.g. "
                               f"head=8,patch_embed=8; types: {', '.join(LAYER_TYPE_NAMES)}")

    quantize.add_argument("--rounds", type=_non_negative_int, default=3, metavar="K",
                          help="iterative-update rounds after the first ILP (default 3)")
    quantize.add_argument("--solver", choices=("auto", "gurobi", "highs"), default="auto",
                          help="ILP solver; auto tries Gurobi, then HiGHS (default auto)")
    quantize.add_argument("--time-limit", type=_positive_float, default=60.0, metavar="SECONDS",
                          help="ILP time limit in seconds (default 60)")

    quantize.add_argument("--calib-images", type=_positive_int, metavar="N",
                          help="calibration images (default 512 for the reference model, 256 otherwise)")
    quantize.add_argument("--eval-images", type=_positive_int, metavar="N",
                          help="test images to evaluate on (default all)")
    quantize.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="batch size (default 64)")
    quantize.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")

    quantize.add_argument("--out", type=Path, default=Path("lampq-out"), metavar="DIR",
                          help="output directory (default ./lampq-out)")
    quantize.add_argument("--cache", type=Path, metavar="DIR",
                          help="directory to cache float-model Fisher traces and type scales")
    quantize.add_argument("--no-progress", action="store_true", help="hide progress bars")
    quantize.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config = RunConfig(
        model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, data=args.data,
        num_classes=args.num_classes, img_size=args.img_size,
        budgets=args.budgets or ["wbits=4", "wbits=3", "w4a4"], strategy=args.strategy,
        baseline=None if args.baseline == "none" else args.baseline,
        weight_bits=args.weight_bits, act_bits=args.act_bits, min_bits=args.min_bits,
        rounds=args.rounds, solver=args.solver, time_limit_s=args.time_limit,
        calib_images=args.calib_images, eval_images=args.eval_images, batch_size=args.batch_size,
        seed=args.seed, out=args.out, cache=args.cache, progress=not args.no_progress,
    )
    try:
        summary = run(config)
    except (ValueError, FileNotFoundError, TracingError, InfeasibleBudgetError, SolverError,
            DataError, NonFiniteError) as error:
        logger.error("%s", error)
        return 2
    print()
    print(format_table(summary["results"], summary["fp32_top1"]))
    print(f"\nwrote {config.out / 'report.md'}, {config.out / 'summary.json'} and one folder per budget "
          f"with allocation.json and bits_per_layer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
