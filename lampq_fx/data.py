"""Image data for calibration and evaluation: ImageFolder directories and the embedded sample."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from tqdm.auto import tqdm

from lampq_fx.session import CalibrationSet

logger = logging.getLogger(__name__)

LAYOUT_HINT = ("--data expects an ImageFolder directory with train/ and test/ subfolders, "
               "each holding one subfolder of images per class")


class DataError(ValueError):
    """A dataset is missing, empty, unreadable or does not fit the model."""


def _loader_for(mode: str) -> Callable[[str], Image.Image]:
    def load(path: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert(mode)
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"cannot read image {path}: {error}; remove or replace the file") from error
    return load


def open_image_folder(root: Path, split: str, transform: Callable, in_chans: int = 3) -> ImageFolder:
    """Open ``root/split`` as an ImageFolder, with errors that name the folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} not found; {LAYOUT_HINT}")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder} not found; {LAYOUT_HINT}")
    try:
        dataset = ImageFolder(str(folder), transform=transform,
                              loader=_loader_for("L" if in_chans == 1 else "RGB"))
    except FileNotFoundError as error:
        raise DataError(f"no images found in {folder}: {str(error).rstrip('.')}. {LAYOUT_HINT}") from error
    if len(dataset) == 0:
        raise DataError(f"no images found in {folder}; {LAYOUT_HINT}")
    return dataset


def check_splits(train: ImageFolder, test: ImageFolder, num_classes: int, root: Path) -> None:
    if train.classes != test.classes:
        raise DataError(
            f"class folders differ between {root}/train ({len(train.classes)} classes) and "
            f"{root}/test ({len(test.classes)} classes): "
            f"only in train {sorted(set(train.classes) - set(test.classes))[:5]}, "
            f"only in test {sorted(set(test.classes) - set(train.classes))[:5]}"
        )
    if num_classes and len(train.classes) > num_classes:
        raise DataError(
            f"{root} has {len(train.classes)} classes but the model outputs {num_classes} "
            "logits; pass --num-classes or a checkpoint trained on this dataset"
        )


def balanced_indices(targets: list[int], count: int, seed: int) -> list[int]:
    """Pick ``count`` indices spread evenly over the classes, reproducibly for ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    shuffled = {c: [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
                for c, members in sorted(by_class.items())}
    picked: list[int] = []
    position = 0
    while len(picked) < min(count, len(targets)):
        for members in shuffled.values():
            if position < len(members) and len(picked) < count:
                picked.append(members[position])
        position += 1
    return sorted(picked)


def _stack(dataset: Dataset, description: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for image, label in tqdm(dataset, desc=description, unit="image", disable=not progress):
        images.append(image)
        labels.append(label)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) != 1:
        raise DataError(f"images of different shapes after the transform: {sorted(shapes)[:3]}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def calibration_from_folder(dataset: ImageFolder, count: int, seed: int,
                            progress: bool = True) -> CalibrationSet:
    """Load a class-balanced sample of ``count`` images into memory."""
    subset = Subset(dataset, balanced_indices(dataset.targets, count, seed))
    images, labels = _stack(subset, "loading calibration images", progress)
    return CalibrationSet(images, labels)


def evaluation_batches(dataset: ImageFolder, count: int | None, seed: int,
                       batch_size: int) -> DataLoader:
    """Batches of up to ``count`` class-balanced test images (all when ``None``)."""
    source: Dataset = dataset
    if count is not None and count < len(dataset):
        source = Subset(dataset, balanced_indices(dataset.targets, count, seed))
    return DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=0)


class TensorBatches:
    """Re-iterable labelled batches over in-memory tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)
