"""Generated and bundled data sets for the dense-labelling pruning benchmark.

Everything is generated procedurally or ships with an installed package; nothing is
downloaded. All generators are deterministic given their seed.

* :mod:`.segmentation`: textured shape scenes for semantic segmentation.
* :mod:`.stereo`: rectified stereo pairs with exact ground-truth disparity.
* :mod:`.digits`: scikit-learn's bundled 8x8 handwritten digits, resized.
* :mod:`.metrics`: mIoU, stereo EPE / bad-pixel rate, top-1 accuracy.
"""

from . import metrics
from .digits import digits_split_indices, load_digits_tensors, make_digits_splits
from .metrics import (
    bad_pixel_rate,
    confusion_matrix,
    iou_from_confusion,
    mean_iou,
    stereo_epe,
    top1,
)
from .segmentation import (
    SEGMENTATION_CLASS_NAMES,
    generate_segmentation_arrays,
    make_segmentation_dataset,
    make_segmentation_splits,
)
from .stereo import generate_stereo_arrays, make_stereo_dataset, make_stereo_splits

__all__ = [
    "SEGMENTATION_CLASS_NAMES",
    "bad_pixel_rate",
    "confusion_matrix",
    "digits_split_indices",
    "generate_segmentation_arrays",
    "generate_stereo_arrays",
    "iou_from_confusion",
    "load_digits_tensors",
    "make_digits_splits",
    "make_segmentation_dataset",
    "make_segmentation_splits",
    "make_stereo_dataset",
    "make_stereo_splits",
    "mean_iou",
    "metrics",
    "stereo_epe",
    "top1",
]
