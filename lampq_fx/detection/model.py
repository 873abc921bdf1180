"""A ViT-backbone FCOS detector whose whole network torch.fx can trace.

Layout (ViTDet style, one feature map from the last block):

    images → ViT → patch tokens as a map at stride p
           → simple pyramid: levels at strides p/2 (transposed conv), p, 2p (max pool)
           → FCOS head (shared conv towers, class logits, box distances, centerness)

Why FCOS: it is anchor-free and single-stage, so the head is a few convolutions with
no region proposals or RoI pooling. Every learned layer is a Conv2d that LampQ can
type and quantize. The loss and the decoding come from torchvision unchanged.
Blood cells span roughly 10 to 60 pixels at the input size used here, which the
stride-7 level of a patch-14 backbone covers.

``DetectorCore`` (backbone, pyramid, head) is the traceable part: it returns the head
outputs as tensors [B, positions, ·]. ``ViTFCOS`` adds what cannot be traced (target
matching, the loss, box decoding and NMS) by delegating to a torchvision ``FCOS``
that shares the same modules. ``per_sample_loss`` gives one FCOS training loss per
image, which is what the per-sample Fisher metric needs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViTFeatureMap(nn.Module):
    """The last block's patch tokens of a timm ViT as a map [B, C, H/p, W/p]."""

    def __init__(self, vit: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.vit = vit
        self.grid = tuple(grid)
        self.prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        self.out_channels = int(vit.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(images)[:, self.prefix_tokens:]
        return tokens.transpose(1, 2).unflatten(2, self.grid)


class SimplePyramid(nn.Module):
    """Three levels from one map: strides s/2 (upsampled), s and 2s (max-pooled)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.lateral = nn.ModuleList([nn.Conv2d(in_channels // 2, out_channels, 1),
                                      nn.Conv2d(in_channels, out_channels, 1),
                                      nn.Conv2d(in_channels, out_channels, 1)])
        self.smooth = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in range(3)])
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        levels = [F.gelu(self.up(x)), x, F.max_pool2d(x, 2)]
        return OrderedDict((str(i), smooth(lateral(level)))
                           for i, (level, lateral, smooth) in enumerate(zip(levels, self.lateral, self.smooth)))


class DetectorBackbone(nn.Module):
    def __init__(self, body: ViTFeatureMap, pyramid: SimplePyramid) -> None:
        super().__init__()
        self.body = body
        self.pyramid = pyramid
        self.out_channels = pyramid.out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        return self.pyramid(self.body(images))


class TraceableFCOSHead(FCOSHead):
    """torchvision's FCOS head with a forward that avoids unpacking tensor shapes (one anchor per position)."""

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, boxes, centerness = [], [], []
        for features in x:
            classified = self.classification_head.cls_logits(self.classification_head.conv(features))
            logits.append(classified.flatten(2).transpose(1, 2))
            regressed = self.regression_head.conv(features)
            boxes.append(F.relu(self.regression_head.bbox_reg(regressed)).flatten(2).transpose(1, 2))
            centerness.append(self.regression_head.bbox_ctrness(regressed).flatten(2).transpose(1, 2))
        return {"cls_logits": torch.cat(logits, 1), "bbox_regression": torch.cat(boxes, 1),
                "bbox_ctrness": torch.cat(centerness, 1)}


class DetectorCore(nn.Module):
    """Backbone, pyramid and head: the part LampQ traces, scores and quantizes."""

    def __init__(self, backbone: DetectorBackbone, head: TraceableFCOSHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(list(self.backbone(images).values()))


class ViTFCOS(nn.Module):
    """FCOS on a ViT at a fixed input size; inputs are normalized images [B, 3, H, W]."""

    def __init__(self, vit: nn.Module, num_classes: int, image_size: tuple[int, int], *, channels: int = 128,
                 head_convs: int = 2, score_thresh: float = 0.05, detections_per_img: int = 100) -> None:
        super().__init__()
        patch = vit.patch_embed.patch_size[0]
        height, width = image_size
        if patch % 2 or height % (2 * patch) or width % (2 * patch):
            raise ValueError(f"the patch size ({patch}) must be even and the image size {image_size} a "
                             "multiple of twice the patch size")
        self.image_size = (height, width)
        grid = (height // patch, width // patch)
        backbone = DetectorBackbone(ViTFeatureMap(vit, grid), SimplePyramid(vit.embed_dim, channels))
        head = TraceableFCOSHead(channels, num_anchors=1, num_classes=num_classes, num_convs=head_convs)
        self.core = DetectorCore(backbone, head)
        strides = (patch // 2, patch, 2 * patch)
        generator = AnchorGenerator(sizes=tuple((s,) for s in strides), aspect_ratios=((1.0,),) * 3)
        # torchvision's FCOS supplies target matching, the loss and decoding; it shares our modules.
        self.fcos = FCOS(backbone, num_classes, anchor_generator=generator, head=head,
                         score_thresh=score_thresh, detections_per_img=detections_per_img)
        sizes = [(grid[0] * 2 // (2 ** i), grid[1] * 2 // (2 ** i)) for i in range(3)]
        self.num_anchors_per_level = [h * w for h, w in sizes]
        features = [torch.zeros(1, 1, h, w) for h, w in sizes]
        anchors = generator(ImageList(torch.zeros(1, 3, height, width), [self.image_size]), features)[0]
        self.register_buffer("anchors", anchors, persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.core(images)

    def per_sample_loss(self, outputs: dict[str, torch.Tensor], targets: Sequence[dict]) -> torch.Tensor:
        """FCOS loss (classification + box + centerness) of each image on its own, shape [B]."""
        losses = []
        for index, target in enumerate(targets):
            single = {key: value[index:index + 1] for key, value in outputs.items()}
            parts = self.fcos.compute_loss([target], single, [self.anchors], self.num_anchors_per_level)
            losses.append(sum(parts.values()))
        return torch.stack(losses)

    def batch_loss(self, outputs: dict[str, torch.Tensor], targets: Sequence[dict]) -> torch.Tensor:
        """FCOS loss of the batch as torchvision trains it (normalized by the batch's foreground count)."""
        parts = self.fcos.compute_loss(list(targets), outputs, [self.anchors] * len(targets),
                                       self.num_anchors_per_level)
        return sum(parts.values())

    @torch.no_grad()
    def decode(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Boxes (input-image pixels), scores and labels per image, after NMS."""
        count = outputs["cls_logits"].shape[0]
        split = {key: list(value.split(self.num_anchors_per_level, dim=1)) for key, value in outputs.items()}
        anchors = [list(self.anchors.split(self.num_anchors_per_level))] * count
        return self.fcos.postprocess_detections(split, anchors, [self.image_size] * count)


def detection_loss(model: ViTFCOS):
    """Return a ``loss_fn(outputs, targets)`` for ``LampQSession``: per-image FCOS losses."""
    def loss(outputs: dict[str, torch.Tensor], targets: Sequence[dict]) -> torch.Tensor:
        return model.per_sample_loss(outputs, targets)
    loss.__qualname__ = "fcos_per_sample_loss"
    return loss
