"""Zero-shot (data-free) calibration: images that a ViT generates for itself.

In the spirit of PSAQ-ViT, images start as Gaussian noise x ~ N(0, I) (in the model's
normalized input space) and are optimized with Adam to minimize

    L(x) = − Σ_b H_b(x) + λ_ce · CE(f(x), ŷ) + λ_tv · TV(x)

* H_b is the differential entropy of the patch-similarity distribution of block b:
  the cosine similarities s_ij between the patch tokens of the block's attention
  output (the ``proj`` layer's output), estimated with a Gaussian kernel density
  over M sampled pairs, H = −(1/M) Σ_k log((1/M) Σ_l φ_h(s_k − s_l)). Real images give
  diverse patches, so their similarities spread out and H is high. Noise and
  collapsed images give similarities bunched together and H is low.
* CE(f(x), ŷ) pulls each image toward a pseudo-label ŷ drawn uniformly from the
  classes. ``ce_weight=0`` drops it, and so does a model without class logits.
* TV(x) = mean |x[:, :, i+1, j] − x[:, :, i, j]| + mean |x[:, :, i, j+1] − x[:, :, i, j]|
  is a small smoothness prior.

The images are labelled with the model's own predictions when they are used for
calibration. A detector has no class logits, so its cross-entropy term is dropped: the
entropy and smoothness terms shape the images alone, and its own confident detections
(``pseudo_targets``) become the boxes its loss is scored against. Results are cached per model weights, settings and seed under the user
cache directory, so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lampq_fx.analysis.layer_types import LayerType, annotate_layers
from lampq_fx.analysis.tracing import trace_model

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


class NoAttentionError(ValueError):
    """The model has no attention block whose output the patch-similarity term can read."""


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic-image generator (see the module docstring for the loss)."""

    images: int = 128
    steps: int = 200
    lr: float = 0.1
    batch_size: int = 32
    ce_weight: float = 1.0
    tv_weight: float = 0.05
    pairs: int = 256  # similarity pairs per image and block for the density estimate
    bandwidth: float = 0.05
    seed: int = 0


def similarity_entropy(tokens: torch.Tensor, pairs: int, bandwidth: float, generator: torch.Generator) -> torch.Tensor:
    """Kernel-density entropy of cosine similarities between patch tokens [B, N, C], one value per image."""
    normalized = F.normalize(tokens.float(), dim=-1)
    similarity = normalized @ normalized.transpose(1, 2)  # [B, N, N]
    count = tokens.shape[1]
    rows = torch.randint(0, count, (pairs,), generator=generator)
    columns = (rows + torch.randint(1, count, (pairs,), generator=generator)) % count  # never the diagonal
    values = similarity[:, rows, columns]  # [B, M]
    differences = values[:, :, None] - values[:, None, :]
    density = torch.exp(-0.5 * (differences / bandwidth) ** 2).mean(-1) / (bandwidth * math.sqrt(2 * math.pi))
    return -torch.log(density + 1e-12).mean(-1)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    vertical = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    horizontal = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return vertical + horizontal


class SyntheticGenerator:
    """Optimizes noise images against a model's patch-similarity entropy (and pseudo-labels)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], config: SyntheticConfig = SyntheticConfig(),
                 *, classify: bool = True) -> None:
        self.config = config
        self.input_shape = tuple(input_shape)
        example = torch.zeros(1, *self.input_shape)
        self.traced = trace_model(model, example)
        for parameter in self.traced.parameters():
            parameter.requires_grad_(False)
        layers = annotate_layers(self.traced, example)
        self.attention_outputs = [layer.name for layer in layers if layer.layer_type is LayerType.PROJ]
        if not self.attention_outputs:
            raise NoAttentionError(f"{type(model).__name__} has no attention block (no layer typed proj), so the "
                                   "patch-similarity term has no patch tokens to read; use --calib noise or real data")
        self.classify = classify and config.ce_weight > 0
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", getattr(model, "num_prefix", 1)))
        self._captured: list[torch.Tensor] = []
        for name in self.attention_outputs:
            self.traced.get_submodule(name).register_forward_hook(lambda _m, _i, output: self._captured.append(output))

    def loss(self, images: torch.Tensor, targets: torch.Tensor | None, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict]:
        """The generator loss per image [B] and its parts (batch means) for logging."""
        self._captured.clear()
        outputs = self.traced(images)
        entropy = torch.zeros(len(images))
        for tokens in self._captured:
            patches = tokens[:, self.prefix_tokens:] if tokens.dim() == 3 and tokens.shape[1] > 2 else tokens
            entropy = entropy + similarity_entropy(patches, self.config.pairs, self.config.bandwidth, generator)
        loss = -entropy + self.config.tv_weight * total_variation(images)
        parts = {"entropy": float(entropy.mean().detach())}
        if self.classify and targets is not None and isinstance(outputs, torch.Tensor):
            cross_entropy = F.cross_entropy(outputs, targets, reduction="none")
            loss = loss + self.config.ce_weight * cross_entropy
            parts["cross_entropy"] = float(cross_entropy.mean().detach())
        return loss, parts

    def generate(self, progress: bool = True) -> tuple[torch.Tensor, list[float]]:
        """Return ``config.images`` images [N, C, H, W] and the mean loss per step."""
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        batches, history = [], [0.0] * config.steps
        with torch.no_grad():
            probe = self.traced(torch.zeros(1, *self.input_shape))
        classes = probe.shape[-1] if isinstance(probe, torch.Tensor) and probe.dim() == 2 else None
        if self.classify and classes is None:
            logger.info("the model has no class logits: the cross-entropy term is dropped")
            self.classify = False
        bar = tqdm(total=config.steps * math.ceil(config.images / config.batch_size), desc="synthetic images",
                   unit="step", disable=not progress)
        for start in range(0, config.images, config.batch_size):
            count = min(config.batch_size, config.images - start)
            images = torch.randn(count, *self.input_shape, generator=generator).requires_grad_(True)
            targets = torch.randint(0, classes, (count,), generator=generator) if self.classify else None
            optimizer = torch.optim.Adam([images], lr=config.lr)
            for step in range(config.steps):
                loss, parts = self.loss(images, targets, generator)
                optimizer.zero_grad()
                loss.mean().backward()
                optimizer.step()
                history[step] += float(loss.mean().detach()) * count / config.images
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
            batches.append(images.detach())
        bar.close()
        return torch.cat(batches), history


def _cache_key(model: nn.Module, input_shape: tuple[int, ...], config: SyntheticConfig, classify: bool) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    digest.update(json.dumps([CACHE_FORMAT, list(input_shape), asdict(config), classify]).encode())
    return digest.hexdigest()[:20]


def synthetic_images(model: nn.Module, input_shape: tuple[int, int, int], config: SyntheticConfig = SyntheticConfig(),
                     *, classify: bool = True, cache_dir: Path | None = None, use_cache: bool = True,
                     progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Generate (or load from the cache) synthetic calibration images; returns them and run facts."""
    import time

    from lampq_fx.io import write_bytes_atomic
    from lampq_fx.pretrained.dinov2_onnx import user_cache_dir
    directory = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "synthetic"
    path = directory / f"synthetic-{_cache_key(model, input_shape, config, classify)}.pt"
    if use_cache and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            logger.info("synthetic images loaded from cache %s", path)
            return saved["images"], {"from_cache": True, "path": str(path), "seconds": 0.0,
                                     "history": saved["history"]}
        except Exception as error:  # a truncated or foreign file: generate again
            logger.warning("ignoring unreadable synthetic-image cache %s (%s)", path, error)
    started = time.perf_counter()
    images, history = SyntheticGenerator(model, input_shape, config, classify=classify).generate(progress)
    seconds = time.perf_counter() - started
    logger.info("generated %d synthetic images in %.0f s (loss %.4f → %.4f)", len(images), seconds,
                history[0], history[-1])
    if use_cache:
        import io
        buffer = io.BytesIO()
        torch.save({"images": images, "history": history}, buffer)
        try:
            write_bytes_atomic(path, buffer.getvalue())
        except OSError as error:
            logger.warning("could not cache synthetic images in %s: %s", path, error)
    return images, {"from_cache": False, "path": str(path), "seconds": seconds, "history": history}


def replace_calibration(model: nn.Module, calibration, mode: str, config: SyntheticConfig, *,
                        progress: bool = True, pseudo_targets=None) -> tuple[object, dict]:
    """Calibration images from ``mode`` ('synthetic' or 'noise'), labelled by the model itself.

    ``calibration`` supplies the input shape and the image count. Classifiers are
    labelled with their top-1 prediction. Any other model needs ``pseudo_targets``:
    a function from a batch of images to the targets its loss takes (for the BCCD
    detector, its detections above a score threshold). Returns the new
    ``CalibrationSet`` and facts about the generation (time, cache use).
    """
    from lampq_fx.session import CalibrationSet
    if not isinstance(calibration.labels, torch.Tensor) and pseudo_targets is None:
        raise ValueError(f"--calib {mode} needs targets for this model's loss; pass pseudo_targets (a function "
                         "from images to targets): classifiers get their own top-1 predictions")
    shape = tuple(calibration.images.shape[1:])
    count = len(calibration.images)
    config = SyntheticConfig(**{**asdict(config), "images": count})
    if mode == "synthetic":
        images, facts = synthetic_images(model, shape, config, progress=progress)
    elif mode == "noise":
        images = torch.randn(count, *shape, generator=torch.Generator().manual_seed(config.seed))
        facts = {"from_cache": False, "seconds": 0.0}
    else:
        raise ValueError(f"unknown calibration source {mode!r}; use data, synthetic or noise")
    model.eval()
    with torch.no_grad():
        if pseudo_targets is not None:
            labels = [target for i in range(0, count, 8) for target in pseudo_targets(images[i:i + 8])]
        else:
            labels = torch.cat([model(images[i:i + 64]).argmax(-1) for i in range(0, count, 64)])
    facts.update(mode=mode, images=count)
    return CalibrationSet(images, labels), facts
