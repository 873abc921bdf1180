"""The embedded reference model: a small timm ViT trained on Fashion-MNIST.

The weights and a real data sample ship inside the package so that the default
``lampq quantize`` run needs no network, no apt package and no external data.
"""

from lampq_fx.reference.model import (
    FMNIST_CLASSES,
    FMNIST_MEAN,
    FMNIST_STD,
    build_reference_model,
    load_reference_model,
    load_reference_sample,
)

__all__ = [
    "FMNIST_CLASSES",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "build_reference_model",
    "load_reference_model",
    "load_reference_sample",
]
