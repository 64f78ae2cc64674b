"""Demo of AutoAnchor: a tiny YOLOv5-style detector trained on images rendered from real COCO boxes."""

from lightning_autoanchor.demo.data import RenderedBoxesDataModule
from lightning_autoanchor.demo.model import TinyYolo, YoloHead, YoloLoss

__all__ = ["RenderedBoxesDataModule", "TinyYolo", "YoloHead", "YoloLoss"]
