"""Build and load the embedded Fashion-MNIST ViT and its data sample."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean and standard deviation of the Fashion-MNIST training pixels in [0, 1].
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

WEIGHTS_FILE = "fmnist_vit.pt"
SAMPLE_FILE = "fmnist_sample.npz"


def build_reference_model() -> VisionTransformer:
    """Build the reference architecture: ViT, 28x28 grey input, patch 4, 6 blocks of width 96."""
    return VisionTransformer(
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=len(FMNIST_CLASSES),
        embed_dim=96,
        depth=6,
        num_heads=3,
        mlp_ratio=2.0,
    )


def load_reference_model() -> VisionTransformer:
    """Load the shipped weights into the reference architecture, in eval mode."""
    model = build_reference_model()
    asset = resources.files("lampq_fx.reference") / "assets" / WEIGHTS_FILE
    with resources.as_file(asset) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def normalize_fmnist(images_uint8: np.ndarray) -> torch.Tensor:
    """Turn uint8 images of shape [N, 28, 28] into normalized float tensors [N, 1, 28, 28]."""
    images = torch.from_numpy(np.array(images_uint8, copy=True)).float().div_(255.0)
    return images.sub_(FMNIST_MEAN).div_(FMNIST_STD).unsqueeze(1)


def load_reference_sample() -> dict[str, torch.Tensor]:
    """Load the shipped Fashion-MNIST sample.

    Returns a dict with ``calib_images``/``calib_labels`` (512 training images, balanced
    over classes) and ``test_images``/``test_labels`` (the full 10,000-image test split).
    Images are normalized float tensors of shape [N, 1, 28, 28].
    """
    asset = resources.files("lampq_fx.reference") / "assets" / SAMPLE_FILE
    with resources.as_file(asset) as path, np.load(path) as arrays:
        return {
            "calib_images": normalize_fmnist(arrays["calib_images"]),
            "calib_labels": torch.from_numpy(arrays["calib_labels"].astype(np.int64)),
            "test_images": normalize_fmnist(arrays["test_images"]),
            "test_labels": torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        }
