"""Dataset loaders (pure numpy)."""

from astra_jax.data.images import (
    DatasetError,
    ImageSplit,
    augment_flip_crop,
    batches,
    load_image_dataset,
    normalize,
    pad_to,
)

__all__ = [
    "DatasetError",
    "ImageSplit",
    "augment_flip_crop",
    "batches",
    "load_image_dataset",
    "normalize",
    "pad_to",
]
