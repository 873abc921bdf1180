"""Train the embedded reference ViT on Fashion-MNIST and export the package assets.

Needs the Debian package ``dataset-fashion-mnist`` (MIT licence), which installs the
original IDX files under /usr/share/datasets/fashion-mnist::

    apt-get install dataset-fashion-mnist
    python -m lampq_fx.reference.train_fmnist --epochs 14

Writes ``assets/fmnist_vit.pt`` (state dict) and ``assets/fmnist_sample.npz``
(512 balanced training images for calibration and the full test split).
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lampq_fx.reference.model import (
    SAMPLE_FILE,
    WEIGHTS_FILE,
    build_reference_model,
    normalize_fmnist,
)

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
ASSET_DIR = Path(__file__).resolve().parent / "assets"
CALIB_PER_CLASS = 51  # 510 images, rounded up to 512 with two extra samples


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST container format) into a uint8 array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(source: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = source / f"{prefix}-images-idx3-ubyte.gz"
    labels = source / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: install the Debian package dataset-fashion-mnist "
                "or pass --source DIR with the four IDX .gz files"
            )
    return read_idx(images), read_idx(labels)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (padding then cropping)."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    padded = F.pad(batch, (2, 2, 2, 2), value=float(batch.min()))
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + 28, dx:dx + 28]


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 500):
        logits = model(images[start:start + 500])
        correct += int((logits.argmax(1) == labels[start:start + 500]).sum())
    return correct / len(images)


def select_calibration(labels: np.ndarray, seed: int) -> np.ndarray:
    """Pick a class-balanced set of 512 training indices."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(10):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(members, CALIB_PER_CLASS, replace=False))
    picked = np.concatenate(chosen)
    remaining = np.setdiff1d(np.arange(len(labels)), picked)
    extra = rng.choice(remaining, 512 - len(picked), replace=False)
    return np.sort(np.concatenate([picked, extra]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help="folder with the Fashion-MNIST IDX .gz files")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="asset folder to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_raw, train_labels_raw = load_split(args.source, "train")
    test_raw, test_labels_raw = load_split(args.source, "t10k")
    train_images = normalize_fmnist(train_raw)
    train_labels = torch.from_numpy(train_labels_raw.astype(np.int64))
    test_images = normalize_fmnist(test_raw)
    test_labels = torch.from_numpy(test_labels_raw.astype(np.int64))

    model = build_reference_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = steps_per_epoch // 2

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * args.lr * (1.0 + math.cos(math.pi * progress))

    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        started = time.time()
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            batch = augment(train_images[index], generator)
            loss = F.cross_entropy(model(batch), train_labels[index])
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
        accuracy = evaluate(model, test_images, test_labels)
        logger.info("epoch %d/%d: last loss %.3f, test top-1 %.2f%%, %.0f s",
                    epoch + 1, args.epochs, loss.item(), 100 * accuracy, time.time() - started)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / WEIGHTS_FILE)
    calib_index = select_calibration(train_labels_raw, args.seed)
    np.savez_compressed(
        args.out / SAMPLE_FILE,
        calib_images=train_raw[calib_index],
        calib_labels=train_labels_raw[calib_index],
        test_images=test_raw,
        test_labels=test_labels_raw,
    )
    logger.info("wrote %s and %s; final test top-1 %.2f%%",
                args.out / WEIGHTS_FILE, args.out / SAMPLE_FILE, 100 * accuracy)


if __name__ == "__main__":
    main()
