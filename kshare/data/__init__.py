"""Data: where images come from (`datasets`: built-in datasets and image folders, read from local
files; `sources`: any iterable, DataLoader, Dataset or tensor a user has) and how a model is fed
(`feed`: the adapter that turns them into its input, as it was trained). Uses models (the input
recipe) and core only."""

from kshare.data.datasets import FASHION_MNIST_ROOT, MAX_IMAGE_SIZE, NAMES, Decoding, ImageData, check_splits, load_data
from kshare.data.feed import (
                              Adapter,
                              adapter_for,
                              decoding_for,
                              input_channels,
                              model_recipe,
                              override_recipe,
                              recipe_for,
)
from kshare.data.sources import ImageSource, as_image_data

__all__ = ["FASHION_MNIST_ROOT", "MAX_IMAGE_SIZE", "NAMES", "Adapter", "Decoding", "ImageData", "ImageSource",
           "adapter_for", "as_image_data", "check_splits", "decoding_for", "input_channels", "load_data",
           "model_recipe", "override_recipe", "recipe_for"]
