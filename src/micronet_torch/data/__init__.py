"""Image data for training, evaluation, prediction and calibration: folders, built-in datasets, loaders.

A leaf of the package (it imports no model code), so that every layer above — the model loader's
recorded preprocessing, training, int8 calibration, the tools — reads images one way.
"""

from .build import Data, build_data, build_eval_loader
from .builtin import BUILTIN, FASHION_MNIST_CLASSES, data_home, load_builtin, prepare_fashion_mnist
from .config import IMAGENET_MEAN, IMAGENET_STD, SMALL_MAX, DataConfig, DataError, default_policy
from .folders import ImageFolderSplit, eval_folder, find_splits, scan_folder
from .images import IMG_EXTENSIONS, augment_batch, eval_pixels, image_to_uint8, normalize, open_image, resize_uint8
from .loaders import (
    BadImages,
    FolderDataset,
    ListSampler,
    StreamLoader,
    TensorLoader,
    build_crop_train_transform,
    decode_folder,
    epoch_permutation,
    shard,
)

__all__ = [
    "BUILTIN",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "SMALL_MAX",
    "BadImages",
    "Data",
    "DataConfig",
    "DataError",
    "FolderDataset",
    "ImageFolderSplit",
    "ListSampler",
    "StreamLoader",
    "TensorLoader",
    "augment_batch",
    "build_crop_train_transform",
    "build_data",
    "build_eval_loader",
    "data_home",
    "decode_folder",
    "default_policy",
    "epoch_permutation",
    "eval_folder",
    "eval_pixels",
    "find_splits",
    "image_to_uint8",
    "load_builtin",
    "normalize",
    "open_image",
    "prepare_fashion_mnist",
    "resize_uint8",
    "scan_folder",
    "shard",
]
