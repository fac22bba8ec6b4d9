"""Data layer: discover samples of each dataset format, preprocess images and masks, serve them to torch.

    from fastflow.data import load_samples, Preprocess, AnomalyDataset
    samples = load_samples("mvtec", "data/mvtec_ad", "bottle", "train")
    dataset = AnomalyDataset(samples, Preprocess((256, 256), mean, std), augment=True)
"""

from .augment import augment_pair
from .dataset import AnomalyDataset, DecodedImages, check_readable
from .files import IMAGE_EXTENSIONS
from .formats import FORMATS, SPLITS, list_categories, load_samples
from .preprocess import Preprocess, load_image, load_mask
from .samples import DatasetError, Sample

__all__ = [
    "IMAGE_EXTENSIONS", "FORMATS", "SPLITS", "AnomalyDataset", "DatasetError", "DecodedImages", "Preprocess", "Sample",
    "augment_pair", "check_readable", "list_categories", "load_image", "load_mask", "load_samples",
]
