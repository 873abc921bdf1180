"""LampQ as an Intel Neural Compressor 3.x algorithm (tested with neural-compressor-pt 3.10).

Importing this module registers ``LampQConfig`` under the algorithm name ``"lampq"``
(``register_config``) and its entry function (``register_algo``), so that

    from neural_compressor.torch.quantization import quantize, prepare, convert, autotune, TuningConfig
    import lampq_fx.inc  # registers the plugin
    qmodel = quantize(model, LampQConfig(budget="wbits=4"), run_fn=calibrate, example_inputs=(x,))

returns the LampQ model: simulated (``lower=False``) or lowered to CPU kernels
(``lower=True``). The returned model carries ``lampq_allocation`` (an ``Allocation``)
and ``lampq_config`` (the config that produced it).

Zero-shot: ``calib="synthetic"`` replaces the recorded images by as many images
generated from the model itself (``lampq_fx.zeroshot``), and ``calib="noise"`` by
Gaussian noise. Either way the recorded images only give the shape and the count.

Calibration: ``prepare`` wraps the model in a recorder that keeps the images passed to
it (up to ``calib_images``). ``run_fn`` may call ``model(images, targets=labels)`` to
give true labels; without them LampQ uses the float model's predictions as labels for
the Fisher metric. ``convert`` then runs the same session and strategy as
``lampq quantize``, so for the same images, labels and seed both give the same
allocation.

Tuning: ``LampQConfig.get_config_set_for_tuning()`` is a budget ladder ordered from the
smallest budget up. ``autotune`` stops at the first rung whose score meets
neural-compressor's relative tolerance, ``score ≥ baseline · (1 − tolerable_loss)``
(higher is better, baseline = ``eval_fn`` on the float model), so it returns the
smallest budget within tolerance. When no rung meets it, neural-compressor returns
the rung with the best score (re-quantized), never the float model.
"""

from typing import List

import torch
from torch import nn

try:
    from neural_compressor.common.base_config import register_config
    from neural_compressor.common.utils import DEFAULT_WHITE_LIST, Mode
    from neural_compressor.torch.quantization.config import TorchBaseConfig
    from neural_compressor.torch.utils.utility import register_algo
except ImportError as error:  # the rest of lampq_fx works without neural-compressor
    raise ImportError("lampq_fx.inc needs neural-compressor 3.x for PyTorch; install the tested version with "
                      "pip install 'lampq-fx[inc]' (neural-compressor-pt==3.10)") from error

from lampq_fx.allocation.solve import check_budget_feasible
from lampq_fx.allocation.space import SearchSpace
from lampq_fx.pipeline import parse_budget
from lampq_fx.session import CalibrationSet, LampQSession
from lampq_fx.strategies import get_strategy, strategy_names

ALGO_NAME = "lampq"
TESTED_VERSION = "3.10"
BUDGET_LADDER = ["wbits=3", "wbits=3.5", "wbits=4", "wbits=5", "wbits=6", "wbits=8"]


@register_config(framework_name="torch", algo_name=ALGO_NAME)
class LampQConfig(TorchBaseConfig):
    """Neural-compressor config for a LampQ (or other lampq_fx strategy) allocation.

    ``budget`` takes the CLI's forms: ``wbits=4``, ``mb=2.5``, ``gbops=1.2``, ``w4a4``.
    A list of budgets expands into one config per budget for ``autotune``.
    """

    name = ALGO_NAME

    def __init__(
        self,
        budget: str = "wbits=4",
        strategy: str = "lampq",
        weight_bits: List[int] = [2, 3, 4, 5, 6, 8],  # noqa: B006 - neural-compressor reads defaults from the signature
        act_bits: List[int] = [8],  # noqa: B006
        rounds: int = 3,
        calib_images: int = 512,
        batch_size: int = 64,
        seed: int = 0,
        solver: str = "auto",
        lower: bool = False,
        lower_mode: str = "static",
        calib: str = "data",
        synthetic_steps: int = 200,
        white_list=DEFAULT_WHITE_LIST,
        **kwargs,
    ):
        super().__init__(white_list=white_list)
        self.budget = budget
        self.strategy = strategy
        self.weight_bits = list(weight_bits)
        self.act_bits = list(act_bits)
        self.rounds = rounds
        self.calib_images = calib_images
        self.batch_size = batch_size
        self.seed = seed
        self.solver = solver
        self.lower = lower
        self.lower_mode = lower_mode
        self.calib = calib
        self.synthetic_steps = synthetic_steps
        self._post_init()

    def check(self) -> None:
        """Raise ValueError for settings that cannot run; budgets are checked per rung."""
        budgets = self.budget if isinstance(self.budget, list) else [self.budget]
        for text in budgets:
            parse_budget(text)
        if self.strategy not in strategy_names():
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(strategy_names())}")
        if self.lower_mode not in ("static", "dynamic"):
            raise ValueError(f"lower_mode must be 'static' or 'dynamic', got {self.lower_mode!r}")
        if self.calib not in ("data", "synthetic", "noise"):
            raise ValueError(f"calib must be 'data', 'synthetic' or 'noise', got {self.calib!r}")
        if self.calib_images < 1 or self.batch_size < 1:
            raise ValueError("calib_images and batch_size must be ≥ 1")

    @classmethod
    def register_supported_configs(cls) -> None:
        cls.supported_configs = []

    @staticmethod
    def get_model_info(model: nn.Module) -> list:
        # LampQ allocates over the whole model at once, so neural-compressor gets one op.
        return [("model", type(model).__name__)]

    def to_config_mapping(self, config_list=None, model_info=None) -> dict:
        return {("model", "model"): self}

    @classmethod
    def get_config_set_for_tuning(cls) -> "LampQConfig":
        """Budget ladder from 3 to 8 average weight bits, smallest first."""
        return cls(budget=list(BUDGET_LADDER))


def get_default_lampq_config() -> LampQConfig:
    return LampQConfig()


class CalibrationRecorder(nn.Module):
    """The float model that ``prepare`` returns; it records the images (and labels) passed to it."""

    def __init__(self, model: nn.Module, max_images: int) -> None:
        super().__init__()
        self.model = model
        self.max_images = max_images
        self.images: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    @property
    def recorded(self) -> int:
        return sum(len(batch) for batch in self.images)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        room = self.max_images - self.recorded
        if room > 0:
            self.images.append(images[:room].detach().clone())
            if targets is not None:
                self.targets.append(targets[:room].detach().clone())
        return self.model(images)


def _calibration_set(recorder: CalibrationRecorder, example_inputs) -> CalibrationSet:
    images = recorder.images
    if not images and example_inputs is not None:
        example = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        images = [example.detach().clone()]
    if not images:
        raise ValueError("LampQ needs calibration images: pass run_fn (it must call the prepared model on "
                         "images) or example_inputs")
    stacked = torch.cat(images)
    if recorder.targets:
        if len(recorder.targets) != len(recorder.images):
            raise ValueError("run_fn passed targets for some calibration batches only; pass them for all or none")
        labels = torch.cat(recorder.targets)
    else:
        with torch.no_grad():
            labels = torch.cat([recorder.model(stacked[i:i + 64]).argmax(-1) for i in range(0, len(stacked), 64)])
    return CalibrationSet(stacked, labels)


def _quantize_recorded(recorder: CalibrationRecorder, config: LampQConfig, example_inputs) -> nn.Module:
    config.check()
    calibration = _calibration_set(recorder, example_inputs)
    if config.calib != "data":  # zero-shot: the recorded images only give the shape and the count
        from lampq_fx.zeroshot import SyntheticConfig, replace_calibration
        calibration, _ = replace_calibration(recorder.model, calibration, config.calib,
                                             SyntheticConfig(steps=config.synthetic_steps, seed=config.seed),
                                             progress=False)
    spec = parse_budget(config.budget)
    space = spec.space(SearchSpace(tuple(config.weight_bits), tuple(config.act_bits)))
    torch.manual_seed(config.seed)
    session = LampQSession(recorder.model, calibration, batch_size=config.batch_size, seed=config.seed,
                           progress=False)
    budget = spec.resolve(session.layers)
    check_budget_feasible(session.layers, {layer.name: space.candidates(layer) for layer in session.layers},
                          budget, session.float_bytes)
    session.calibrate()
    options = {"solver": config.solver}
    if config.strategy == "lampq":
        options["rounds"] = config.rounds
    allocation = get_strategy(config.strategy, **options).allocate(session, budget, space)
    if config.lower:
        from lampq_fx.deploy import lower_session
        model = lower_session(session, allocation, mode=config.lower_mode).module
    else:
        model = session.quantized_model(allocation)
    model.lampq_allocation = allocation
    model.lampq_config = config
    return model


@register_algo(ALGO_NAME)
def lampq_entry(model: nn.Module, configs_mapping, mode=Mode.QUANTIZE, *args, **kwargs) -> nn.Module:
    """Neural-compressor entry: PREPARE wraps, CONVERT allocates and quantizes, QUANTIZE does both."""
    config = next(c for c in configs_mapping.values() if getattr(c, "name", None) == ALGO_NAME)
    example_inputs = kwargs.get("example_inputs")
    if mode == Mode.PREPARE:
        config.check()
        return CalibrationRecorder(model, config.calib_images)
    if mode == Mode.CONVERT:
        if not isinstance(model, CalibrationRecorder):
            model = CalibrationRecorder(model, config.calib_images)
        return _quantize_recorded(model, config, example_inputs)
    if mode == Mode.QUANTIZE:
        recorder = CalibrationRecorder(model, config.calib_images)
        run_fn, run_args = kwargs.get("run_fn"), kwargs.get("run_args")
        if run_fn is not None:
            with torch.no_grad():
                if run_args:
                    run_fn(recorder, *run_args)
                else:
                    run_fn(recorder)
        return _quantize_recorded(recorder, config, example_inputs)
    raise ValueError(f"LampQ does not support neural-compressor mode {mode}")
