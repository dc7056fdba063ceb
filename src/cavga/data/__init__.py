"""Datasets: readers for MVTec-layout, image+mask pairs, plain folders, one-class sources and video frames."""

from cavga.data.dataset import AnomalyDataset, DatasetSplits, Record
from cavga.data.folders import read_folders, read_magnetic_tile
from cavga.data.io import IMAGE_EXTENSIONS, load_image, load_mask
from cavga.data.loader import detect_format, load_dataset
from cavga.data.mvtec import list_mvtec_categories, read_mvtec
from cavga.data.oneclass import read_cifar10, read_class_folders, read_idx, read_oneclass
from cavga.data.transforms import Preprocess
from cavga.data.types import ANOMALOUS, NORMAL, Batch, Sample, collate_samples
from cavga.data.video import read_video_frames

__all__ = [
    "ANOMALOUS",
    "IMAGE_EXTENSIONS",
    "NORMAL",
    "AnomalyDataset",
    "Batch",
    "DatasetSplits",
    "Preprocess",
    "Record",
    "Sample",
    "collate_samples",
    "detect_format",
    "list_mvtec_categories",
    "load_dataset",
    "load_image",
    "load_mask",
    "read_cifar10",
    "read_class_folders",
    "read_folders",
    "read_idx",
    "read_magnetic_tile",
    "read_mvtec",
    "read_oneclass",
    "read_video_frames",
]
