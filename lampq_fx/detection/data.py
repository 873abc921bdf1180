"""Detection datasets: Pascal VOC XML and COCO JSON read into one type.

A ``DetectionDataset`` is a list of ``DetectionRecord`` (image path, size, boxes in
absolute ``x1, y1, x2, y2`` pixels, 0-based class indices) plus the class names.
``to_coco`` writes the COCO form (boxes as ``x, y, width, height``, category ids from
1), which is what ``pycocotools`` evaluates, and ``from_coco`` reads it back.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DetectionDataError(ValueError):
    """A detection dataset is missing, malformed or inconsistent."""


@dataclass
class DetectionRecord:
    image: Path
    width: int
    height: int
    boxes: torch.Tensor  # [N, 4] float, x1 y1 x2 y2 in pixels
    labels: torch.Tensor  # [N] int64, 0-based class indices
    image_id: int = 0


@dataclass
class DetectionDataset:
    classes: list[str]
    records: list[DetectionRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DetectionRecord:
        return self.records[index]

    @property
    def num_boxes(self) -> int:
        return sum(len(record.boxes) for record in self.records)

    def subset(self, indices: Sequence[int]) -> "DetectionDataset":
        return DetectionDataset(list(self.classes), [self.records[i] for i in indices])


def _text(element, path: str, source: Path) -> str:
    found = element.find(path)
    if found is None or found.text is None:
        raise DetectionDataError(f"{source}: missing <{path}>")
    return found.text.strip()


def read_voc(root: Path | str, split: str, classes: Sequence[str] | None = None) -> DetectionDataset:
    """Read ``root/ImageSets/Main/{split}.txt``, ``root/Annotations/*.xml`` and ``root/JPEGImages``.

    ``classes`` fixes the class order; by default it is the sorted set of names found.
    Boxes are converted from VOC's 1-based inclusive pixels to ``x1 = xmin - 1``,
    ``x2 = xmax`` so that width = xmax - xmin + 1.
    """
    root = Path(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise DetectionDataError(f"split file {split_file} not found; splits in {root}: {available or 'none'}")
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    parsed = []
    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DetectionDataError(f"annotation {xml_path} for image id {image_id!r} not found")
        tree = ElementTree.parse(xml_path).getroot()
        width, height = int(_text(tree, "size/width", xml_path)), int(_text(tree, "size/height", xml_path))
        objects = []
        for obj in tree.findall("object"):
            name = _text(obj, "name", xml_path)
            box = [float(_text(obj, f"bndbox/{key}", xml_path)) for key in ("xmin", "ymin", "xmax", "ymax")]
            objects.append((name, [box[0] - 1, box[1] - 1, box[2], box[3]]))
        parsed.append((image_id, width, height, objects))
    names = list(classes) if classes is not None else sorted({name for *_, objs in parsed for name, _ in objs})
    index = {name: i for i, name in enumerate(names)}
    records = []
    for number, (image_id, width, height, objects) in enumerate(parsed):
        unknown = sorted({name for name, _ in objects if name not in index})
        if unknown:
            raise DetectionDataError(f"image {image_id}: classes {unknown} are not in {names}")
        boxes = torch.tensor([box for _, box in objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([index[name] for name, _ in objects], dtype=torch.int64)
        records.append(DetectionRecord(root / "JPEGImages" / f"{image_id}.jpg", width, height, boxes, labels,
                                       image_id=number + 1))
    return DetectionDataset(names, records)


def to_coco(dataset: DetectionDataset) -> dict:
    """Return the COCO ground-truth dict of ``dataset`` (category id = class index + 1)."""
    images, annotations = [], []
    for record in dataset.records:
        images.append({"id": record.image_id, "file_name": str(record.image), "width": record.width,
                       "height": record.height})
        for box, label in zip(record.boxes.tolist(), record.labels.tolist()):
            width, height = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": record.image_id, "category_id": label + 1,
                                "bbox": [box[0], box[1], width, height], "area": width * height, "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(dataset.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def from_coco(data: dict | Path | str, image_dir: Path | str | None = None) -> DetectionDataset:
    """Read a COCO ground-truth dict or JSON file; relative file names resolve against ``image_dir``."""
    if not isinstance(data, dict):
        path = Path(data)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DetectionDataError(f"cannot read COCO file {path}: {error}") from error
    try:
        categories = sorted(data["categories"], key=lambda c: c["id"])
        category_index = {c["id"]: i for i, c in enumerate(categories)}
        by_image: dict[int, list[dict]] = {image["id"]: [] for image in data["images"]}
        for annotation in data["annotations"]:
            by_image[annotation["image_id"]].append(annotation)
        records = []
        for image in data["images"]:
            rows = by_image[image["id"]]
            boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                  for a in rows], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor([category_index[a["category_id"]] for a in rows], dtype=torch.int64)
            file_name = Path(image["file_name"])
            if image_dir is not None and not file_name.is_absolute():
                file_name = Path(image_dir) / file_name
            records.append(DetectionRecord(file_name, int(image["width"]), int(image["height"]), boxes, labels,
                                           image_id=int(image["id"])))
    except (KeyError, TypeError, IndexError) as error:
        raise DetectionDataError(f"malformed COCO data: {error!r}") from error
    return DetectionDataset([c["name"] for c in categories], records)
