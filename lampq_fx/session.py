"""One model, one calibration set: the state that every allocation strategy works on.

A ``LampQSession`` traces the model, types and wraps its layers, and then offers the
measurements that strategies combine: Fisher traces (float or partly quantized),
quantization errors, the fitted type scales α_t, calibration loss and top-1 under
any bit assignment. Each expensive result is computed once and reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from lampq_fx.allocation.space import Allocation, SearchSpace
from lampq_fx.analysis.layer_types import META_KEY, LayerInfo, LayerType, annotate_layers
from lampq_fx.analysis.tracing import trace_model
from lampq_fx.io import write_json_atomic
from lampq_fx.metrics.fisher import FisherTrace, LossFunction, classification_loss, compute_fisher_traces
from lampq_fx.metrics.hessian import HessianTraces, hutchinson_traces
from lampq_fx.metrics.sensitivity import ErrorTable, SensitivityTable, TypeScaleFit, fit_type_scales
from lampq_fx.quantize.prepare import apply_bits, calibrate, prepare_quantization, quant_modules

logger = logging.getLogger(__name__)

BitMap = Mapping[str, tuple[int | None, int | None]]
CACHE_FORMAT = 1


@dataclass
class CalibrationSet:
    """Calibration images [N, C, H, W] and their labels, held in memory.

    Labels are integer classes [N], or for detection a list of N target dicts
    (``boxes`` [K, 4] in input pixels, ``labels`` [K]).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"calibration images must have shape [N, C, H, W], got {tuple(self.images.shape)}")
        if len(self.images) == 0:
            raise ValueError("the calibration set is empty")
        if len(self.labels) != len(self.images):
            raise ValueError(f"calibration set has {len(self.images)} images but {len(self.labels)} labels")

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.images[i:i + batch_size], self.labels[i:i + batch_size])
                for i in range(0, len(self.images), batch_size)]


def _label_tensors(labels) -> list[torch.Tensor]:
    """Class labels as one tensor, or detection targets (a list of dicts of tensors) flattened."""
    if isinstance(labels, torch.Tensor):
        return [labels]
    return [target[key] for target in labels for key in sorted(target)]


def _tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class LampQSession:
    """Trace, type and wrap ``model`` once; score, allocate and evaluate many times."""

    def __init__(
        self,
        model: nn.Module,
        calibration: CalibrationSet,
        *,
        loss_fn: LossFunction = classification_loss,
        batch_size: int = 64,
        seed: int = 0,
        leaf_modules: Sequence[type] = (),
        concrete_args: dict | None = None,
        cache_dir: Path | None = None,
        progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.calibration = calibration
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

        example = calibration.images[:1]
        self.traced = trace_model(model, example, leaf_modules=leaf_modules, concrete_args=concrete_args)
        self.layers: list[LayerInfo] = annotate_layers(self.traced, example)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no quantizable layers (Linear, Conv2d "
                             "or activation matmuls) that torch.fx can see")
        self.graph_module = prepare_quantization(self.traced)
        self.modules = quant_modules(self.graph_module)
        quantized_params = sum(layer.weight_params for layer in self.layers)
        total_params = sum(p.numel() for p in self.graph_module.parameters())
        self.float_bytes = 4 * (total_params - quantized_params)
        self._calibrated = False
        self._weight_errors: dict[str, dict[int, float]] = {}
        self._input_errors: dict[str, list[dict[int, float]]] = {}
        self._float_fisher: dict[str, FisherTrace] | None = None
        self._float_loss: float | None = None
        self._alpha: dict[tuple, dict[LayerType, TypeScaleFit]] = {}
        self._hessian: dict[int, HessianTraces] = {}
        self._cache_key = self._make_cache_key()
        # Work done so far, for benchmarks: backward passes over calibration batches and
        # full passes of the calibration set that measure a loss.
        self.counts = {"backward_passes": 0, "loss_evaluations": 0}

    # ----- steps -------------------------------------------------------------------
    def calibrate(self) -> None:
        """Record activation ranges on the calibration images (explicit, never implicit)."""
        images = [images for images, _ in self.calibration.batches(self.batch_size)]
        calibrate(self.graph_module, images, seed=self.seed, progress=self.progress)
        self._calibrated = True
        self._input_errors.clear()

    def _require_calibration(self) -> None:
        if not self._calibrated:
            raise RuntimeError("call LampQSession.calibrate() before scoring or quantizing")

    def apply(self, bits: BitMap | Allocation | None) -> None:
        """Set the bit-widths of every layer; ``None`` makes the whole model float."""
        if isinstance(bits, Allocation):
            bits = bits.bits()
        if bits and any(choice[1] is not None for choice in bits.values()):
            self._require_calibration()
        apply_bits(self.graph_module, bits or {})

    def fisher(self, bits: BitMap | Allocation | None = None) -> dict[str, FisherTrace]:
        """Fisher traces of the model under ``bits`` (float when ``None``; that one is cached)."""
        if bits is None and self._float_fisher is not None:
            return self._float_fisher
        if bits is None:
            cached = self._read_cache("fisher")
            if cached is not None:
                self._float_fisher = {name: FisherTrace.from_dict(v) for name, v in cached.items()}
                logger.info("Fisher traces of the float model loaded from cache %s", self._cache_path())
                return self._float_fisher
        self.apply(bits)
        self.counts["backward_passes"] += len(self.calibration.batches(self.batch_size))
        try:
            traces = compute_fisher_traces(
                self.graph_module, self.calibration.batches(self.batch_size), self.loss_fn,
                progress=self.progress,
                description="Fisher (float)" if bits is None else "Fisher (quantized)")
        finally:
            self.apply(None)
        if bits is None:
            self._float_fisher = traces
            self._write_cache("fisher", {name: t.to_dict() for name, t in traces.items()})
        return traces

    def hessian_traces(self, probes: int = 16) -> HessianTraces:
        """Hutchinson Hessian traces of the float model (computed once per probe count)."""
        if probes not in self._hessian:
            self.apply(None)
            traces = hutchinson_traces(self.graph_module, self.calibration.batches(self.batch_size),
                                       self.loss_fn, probes=probes, seed=self.seed)
            self.counts["backward_passes"] += traces.backward_passes
            self._hessian[probes] = traces
        return self._hessian[probes]

    def reset_measurements(self) -> None:
        """Forget every cached Fisher, Hessian, loss and α_t result (for cold timings).

        The disk cache is left alone: a session with ``cache_dir`` still reads it.
        """
        self._float_fisher = None
        self._float_loss = None
        self._alpha.clear()
        self._hessian.clear()

    @torch.no_grad()
    def calibration_loss(self, bits: BitMap | Allocation | None = None) -> float:
        """Mean task loss over the calibration set under ``bits``."""
        if bits is None and self._float_loss is not None:
            return self._float_loss
        self.apply(bits)
        self.counts["loss_evaluations"] += 1
        try:
            total, count = 0.0, 0
            for images, labels in self.calibration.batches(self.batch_size):
                total += float(self.loss_fn(self.graph_module(images), labels).sum())
                count += len(images)
        finally:
            self.apply(None)
        loss = total / count
        if bits is None:
            self._float_loss = loss
        return loss

    def error_table(self, space: SearchSpace) -> ErrorTable:
        """Mean squared quantization error of every weight and input at every candidate width.

        Errors are computed once per (layer, bit-width) and kept for later spaces.
        """
        self._require_calibration()
        weight, inputs = {}, {}
        for layer in self.layers:
            module = self.modules[layer.name]
            known_weight = self._weight_errors.setdefault(layer.name, {})
            known_inputs = self._input_errors.setdefault(layer.name, [{} for _ in module.input_quantizers])
            if module.has_weight:
                for bits in space.weight_bits:
                    if bits not in known_weight:
                        known_weight[bits] = module.weight_mean_squared_error(bits)
            for quantizer, known in zip(module.input_quantizers, known_inputs):
                for bits in space.act_bits:
                    if bits not in known:
                        known[bits] = quantizer.mean_squared_error(bits)
            weight[layer.name] = {bits: known_weight[bits] for bits in space.weight_bits} if module.has_weight else {}
            inputs[layer.name] = [{bits: known[bits] for bits in space.act_bits} for known in known_inputs]
        return ErrorTable(weight=weight, inputs=inputs)

    def sensitivity(self, space: SearchSpace, *, type_aware: bool = True) -> SensitivityTable:
        """Ω of every layer and candidate: float Fisher × errors, scaled by fitted α_t."""
        self._require_calibration()
        candidates = {layer.name: space.candidates(layer) for layer in self.layers}
        table = SensitivityTable(self.layers, candidates, self.fisher(), self.error_table(space),
                                 alpha={}, type_aware=type_aware)
        if type_aware:
            table.alpha = self.type_scales(space, table)
        for layer in self.layers:
            trace = table.fisher[layer.name]
            layer.fisher_weight, layer.fisher_input = trace.weight, list(trace.inputs)
        return table

    def type_scales(self, space: SearchSpace, table: SensitivityTable) -> dict[LayerType, TypeScaleFit]:
        key = (space.allocates_activations, tuple(sorted(space.min_bits.items())))
        if key in self._alpha:
            return self._alpha[key]
        cache_name = f"alpha-{'wa' if space.allocates_activations else 'w'}"
        cached = self._read_cache(cache_name)
        if cached is not None and not space.min_bits:
            fits = {LayerType(k): TypeScaleFit(v["alpha"], v["points"], v["note"]) for k, v in cached.items()}
        else:
            base = self.calibration_loss(None)
            fits = fit_type_scales(self.layers, table, space,
                                   lambda bits: self.calibration_loss(bits) - base)
            if not space.min_bits:
                self._write_cache(cache_name, {t.value: {"alpha": f.alpha, "points": f.points, "note": f.note}
                                               for t, f in fits.items()})
        self._alpha[key] = fits
        return fits

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 bits: BitMap | Allocation | None = None, description: str = "evaluation") -> float:
        """Top-1 accuracy (0..1) of the model under ``bits`` on labelled ``batches``."""
        self.apply(bits)
        correct = count = 0
        try:
            for images, labels in tqdm(batches, desc=description, unit="batch", disable=not self.progress):
                logits = self.graph_module(images)
                correct += int((logits.argmax(dim=-1) == labels).sum())
                count += len(labels)
        finally:
            self.apply(None)
        if count == 0:
            raise ValueError("the evaluation set is empty")
        return correct / count

    def quantized_model(self, allocation: Allocation) -> fx.GraphModule:
        """Return a standalone simulated-quantized copy of the model under ``allocation``."""
        self.apply(allocation)
        try:
            model = copy.deepcopy(self.graph_module)
            # Graph copies share node.meta values, so give the copy its own annotations.
            for node in model.graph.nodes:
                if META_KEY in node.meta:
                    node.meta[META_KEY] = copy.deepcopy(node.meta[META_KEY])
        finally:
            self.apply(None)
        return model

    # ----- cache -------------------------------------------------------------------
    def _make_cache_key(self) -> str:
        digest = hashlib.sha256()
        digest.update(_tensor_digest(self.traced.state_dict().values()).encode())
        digest.update(_tensor_digest([self.calibration.images, *_label_tensors(self.calibration.labels)]).encode())
        digest.update(json.dumps([CACHE_FORMAT, self.batch_size, self.seed,
                                  getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))]).encode())
        return digest.hexdigest()[:20]

    def _cache_path(self) -> Path | None:
        return self.cache_dir / f"lampq-{self._cache_key}.json" if self.cache_dir else None

    def _read_cache(self, entry: str) -> dict | None:
        path = self._cache_path()
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("ignoring unreadable cache file %s: %s", path, error)
            return None
        return data.get(entry)

    def _write_cache(self, entry: str, value: dict) -> None:
        path = self._cache_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
        data[entry] = value
        write_json_atomic(path, data)

