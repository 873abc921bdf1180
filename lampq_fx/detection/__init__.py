"""Object detection: datasets (VOC and COCO), COCO box AP, and (next) a ViT detector for LampQ."""

from lampq_fx.detection.data import DetectionDataError, DetectionDataset, DetectionRecord, from_coco, read_voc, to_coco
from lampq_fx.detection.evaluate import coco_evaluate

__all__ = ["DetectionDataError", "DetectionDataset", "DetectionRecord", "coco_evaluate", "from_coco", "read_voc",
           "to_coco"]
