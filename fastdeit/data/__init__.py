"""Input pipeline: class-folder scan, sharded epoch sampling, DALI graphs, the trainer's loader.

Mixup/CutMix and random erasing are not here: they run on the device after the loader.
"""
from .config import DataConfig
from .loading.folder import scan_image_folder
from .loading.loader import Loader, TrainLoader, ValLoader, build_loader

__all__ = ["DataConfig", "Loader", "TrainLoader", "ValLoader", "build_loader", "scan_image_folder"]
