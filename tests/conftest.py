"""Shared fixtures: small models built in the test, and the shared CIFAR-10 folder when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(os.environ.get("LAMPQ_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _shared(path: Path, required: list[str], name: str) -> Path:
    if not all((path / part).exists() for part in required):
        reason = f"shared {name} not found at {path} (developer and CI machines have it)"
        if os.environ.get("LAMPQ_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + "; LAMPQ_REQUIRE_SHARED_DATA=1 makes this an error")
        pytest.skip(reason)
    return path


@pytest.fixture
def cifar10_dir() -> Path:
    return _shared(SHARED_DATA / "cifar10", ["train", "test"], "CIFAR-10")


@pytest.fixture
def bccd_dir() -> Path:
    return _shared(SHARED_DATA / "bccd" / "BCCD", ["Annotations", "JPEGImages", "ImageSets/Main/test.txt"], "BCCD")


class TinyViT(nn.Module):
    """A two-block pre-norm ViT with deliberately unusual module names."""

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 5, image: int = 8, patch: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.alpha = nn.Conv2d(1, dim, patch, patch)
        self.token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.position = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({
                "n1": nn.LayerNorm(dim), "mix": nn.Linear(dim, 3 * dim), "out": nn.Linear(dim, dim),
                "n2": nn.LayerNorm(dim), "up": nn.Linear(dim, 2 * dim), "down": nn.Linear(2 * dim, dim),
            }))
        self.final = nn.LayerNorm(dim)
        self.omega = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.alpha(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for block in self.blocks:
            batch, tokens, dim = x.shape
            qkv = block["mix"](block["n1"](x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            attn = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(dim=-1)
            x = x + block["out"]((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))
            x = x + block["down"](torch.nn.functional.gelu(block["up"](block["n2"](x))))
        return self.omega(self.final(x)[:, 0])


@pytest.fixture
def tiny_vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().eval()
