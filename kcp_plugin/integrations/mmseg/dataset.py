"""``GeneratedSegDataset``: kcp_plugin's procedurally generated scenes as an mmseg dataset.

For CI and smoke tests without downloads: on first use the scenes of
:mod:`kcp_plugin.data.segmentation` are written as PNG images and label maps under
``data_root`` (deterministic in ``seed``), after which it is a plain ``BaseSegDataset`` and
mmseg's usual pipelines (``LoadImageFromFile``, ``LoadAnnotations``, ...) apply.
"""

from __future__ import annotations

import json
import os
import os.path as osp
import tempfile
from typing import Any

import numpy as np
from mmseg.datasets import BaseSegDataset

from kcp_plugin.data.segmentation import SEGMENTATION_CLASS_NAMES, generate_segmentation_arrays

from .registry import DATASETS

__all__ = ["GeneratedSegDataset", "write_generated_scenes"]

_PALETTE = [[0, 0, 0], [220, 20, 60], [0, 128, 255], [255, 200, 0], [60, 180, 75],
            [145, 30, 180], [70, 240, 240], [240, 50, 230]]


def write_generated_scenes(root: str, num_images: int, size: tuple[int, int],
                           num_classes: int, seed: int) -> None:
    """Write ``img/{i:05d}.png`` and ``ann/{i:05d}.png`` under ``root`` unless present.

    Written to a temporary directory and renamed, so concurrent writers (DDP ranks) never see
    a partial set. The ``DONE`` marker records the settings, so a folder written with others
    is refused instead of silently reused.

    Raises:
        ValueError: ``root`` holds scenes generated with other settings.
    """
    import cv2

    settings = {"num_images": int(num_images), "size": [int(v) for v in size],
                "num_classes": int(num_classes), "seed": int(seed)}
    done = osp.join(root, "DONE")
    if osp.isfile(done):
        with open(done) as f:
            text = f.read().strip()
        found = json.loads(text) if text else None  # empty: written before settings were kept
        if found is not None and found != settings:
            raise ValueError(f"{root} holds generated scenes made with {found}, not {settings}: "
                             "delete the folder or give the dataset another data_root")
        return
    os.makedirs(osp.dirname(osp.abspath(root)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".generated-", dir=osp.dirname(osp.abspath(root)))
    imgs, labels = generate_segmentation_arrays(num_images, tuple(size), num_classes, seed)
    os.makedirs(osp.join(tmp, "img"))
    os.makedirs(osp.join(tmp, "ann"))
    for i in range(num_images):
        rgb = (imgs[i].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        cv2.imwrite(osp.join(tmp, "img", f"{i:05d}.png"), rgb[:, :, ::-1])  # cv2 writes BGR
        cv2.imwrite(osp.join(tmp, "ann", f"{i:05d}.png"), labels[i].astype(np.uint8))
    with open(osp.join(tmp, "DONE"), "w") as f:
        json.dump(settings, f)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not osp.isfile(osp.join(root, "DONE")):
            raise


@DATASETS.register_module()
class GeneratedSegDataset(BaseSegDataset):
    """Generated segmentation scenes (background + shape classes), written once to disk.

    Args:
        data_root: Directory of this split (created on first use).
        num_images: Number of scenes.
        size: ``(H, W)`` of every scene.
        num_classes: Classes including background, 2 to 8.
        seed: Generator seed (use different seeds for train and val).
        **kwargs: ``BaseSegDataset`` arguments (``pipeline``, ``test_mode``...).
    """

    METAINFO = dict(classes=SEGMENTATION_CLASS_NAMES, palette=_PALETTE)

    def __init__(self, data_root: str, num_images: int = 16, size: tuple[int, int] = (64, 64),
                 num_classes: int = 5, seed: int = 0, **kwargs: Any):
        if not 2 <= num_classes <= len(SEGMENTATION_CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(SEGMENTATION_CLASS_NAMES)}], "
                             f"got {num_classes}")
        write_generated_scenes(data_root, num_images, tuple(size), num_classes, seed)
        metainfo = dict(classes=SEGMENTATION_CLASS_NAMES[:num_classes],
                        palette=_PALETTE[:num_classes])
        kwargs.setdefault("metainfo", metainfo)
        super().__init__(data_root=data_root, img_suffix=".png", seg_map_suffix=".png",
                         data_prefix=dict(img_path="img", seg_map_path="ann"),
                         reduce_zero_label=False, **kwargs)
