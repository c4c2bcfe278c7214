"""From dataset rows to model batches: image operations, augmentation presets, the `datasets` transform and
collator, dataset loading and the checks before training."""

from .augmentation import AugmentationPreset, finetuning_augmentation, pretraining_augmentation
from .checks import check_image_dataset, check_not_empty
from .device_augmentation import DeviceAugmentation
from .image_ops import UndecodableImage, decode_image, normalize_pixel_batch, open_image
from .loading import (
    bundled_sample_data_files,
    detect_image_column,
    label_names,
    load_image_datasets,
    select_per_class,
    undecoded,
)
from .pixels import PixelHeader, pixel_header, read_pixels
from .statistics import ChannelStatistics, channel_statistics, dataset_statistics
from .transforms import SeededImageDataset, SimMIMPretrainingDataset, SimMIMTransform, collate_fn

__all__ = [
    "AugmentationPreset",
    "ChannelStatistics",
    "DeviceAugmentation",
    "PixelHeader",
    "SeededImageDataset",
    "SimMIMPretrainingDataset",
    "SimMIMTransform",
    "UndecodableImage",
    "bundled_sample_data_files",
    "channel_statistics",
    "check_image_dataset",
    "check_not_empty",
    "collate_fn",
    "dataset_statistics",
    "decode_image",
    "detect_image_column",
    "finetuning_augmentation",
    "label_names",
    "load_image_datasets",
    "normalize_pixel_batch",
    "open_image",
    "pixel_header",
    "pretraining_augmentation",
    "read_pixels",
    "select_per_class",
    "undecoded",
]
