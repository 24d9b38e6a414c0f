"""The three MTCNN face-detection networks, loadable with their pretrained weights.

MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks", IEEE SPL 2016) is a cascade of three small CNNs trained on real faces:

* :class:`PNet` (proposal): fully convolutional; on an image ``[B, 3, H, W]`` it returns a box
  regression map ``[B, 4, h, w]`` and a face-probability map ``[B, 2, h, w]`` (softmax over
  non-face / face), ``h = ceil((H - 2) / 2) - 4``: one 12x12 window every 2 pixels.
* :class:`RNet` (refine): a 24x24 crop -> box regression ``[B, 4]``, probability ``[B, 2]``.
* :class:`ONet` (output): a 48x48 crop -> box regression ``[B, 4]``, five landmarks ``[B, 10]``,
  probability ``[B, 2]``.

The architectures and output order follow facenet-pytorch (``facenet_pytorch/models/mtcnn.py``,
MIT licence), whose wheel bundles the pretrained state dicts (``facenet_pytorch/data/*.pt``,
converted from the authors' Caffe models). :func:`load_mtcnn` reads them with
``torch.load(weights_only=True)`` without importing facenet-pytorch (whose metadata pins an old
torch: install it with ``pip install --no-deps facenet-pytorch``, as ``tools/setup_env.sh`` does
for the ``study`` extra). Inputs are RGB in ``[0, 255]`` normalised by :func:`mtcnn_normalize`.

One deliberate difference: upstream flattens R-Net's and O-Net's last feature map channels-last
(``x.permute(0, 3, 2, 1)``) before the first linear layer. Here the map is flattened in the
usual channel-major order and the loader permutes that layer's weight columns to match, so the
outputs are identical and the flatten is the plain one structured pruning maps
(a conv channel owns a contiguous block of the linear layer's inputs).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["MTCNN_NETS", "ONet", "PNet", "RNet", "load_mtcnn", "mtcnn_normalize",
           "mtcnn_weights_path"]


class PNet(nn.Module):
    """MTCNN proposal network (fully convolutional, 12x12 receptive field, stride 2).

    ``forward(x)`` with ``x`` ``[B, 3, H, W]`` (normalised, ``H, W >= 12``) returns
    ``(box [B, 4, h, w], prob [B, 2, h, w])``; ``prob[:, 1]`` is the face probability of the
    12x12 window at ``(2i, 2j)``.
    """

    input_size = 12

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(box regression, face probability)`` maps."""
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    """MTCNN refinement network on 24x24 crops.

    ``forward(x)`` with ``x`` ``[B, 3, 24, 24]`` returns ``(box [B, 4], prob [B, 2])``.
    """

    input_size = 24

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(box regression, face probability)``."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(x.flatten(1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """MTCNN output network on 48x48 crops.

    ``forward(x)`` with ``x`` ``[B, 3, 48, 48]`` returns ``(box [B, 4], landmarks [B, 10],
    prob [B, 2])``.
    """

    input_size = 48

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(box regression, landmarks, face probability)``."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


# name -> (class, first linear layer whose columns upstream orders channels-last, its input
# map (channels, height, width))
MTCNN_NETS: dict[str, tuple[type[nn.Module], str | None, tuple[int, int, int] | None]] = {
    "pnet": (PNet, None, None),
    "rnet": (RNet, "dense4", (64, 3, 3)),
    "onet": (ONet, "dense5", (128, 3, 3)),
}


def _check_name(name: str) -> None:
    if name not in MTCNN_NETS:
        raise ValueError(f"unknown MTCNN network {name!r}; valid names: "
                         f"{', '.join(MTCNN_NETS)}")


def mtcnn_weights_path(name: str) -> Path:
    """Path of the pretrained state dict of ``name`` inside the installed facenet-pytorch.

    The package is located without being imported (``importlib.util.find_spec``): importing it
    needs requests and an old torchvision, which the weights do not.

    Raises:
        ValueError: ``name`` is not ``pnet``, ``rnet`` or ``onet``.
        ModuleNotFoundError: facenet-pytorch is not installed (the message says how).
        FileNotFoundError: the package has no such weights file.
    """
    _check_name(name)
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the pretrained MTCNN weights ship in facenet-pytorch's wheel, which is not "
            "installed: pip install --no-deps facenet-pytorch==2.6.0 (or bash "
            "tools/setup_env.sh study)", name="facenet_pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"facenet-pytorch is installed but has no {path}")
    return path


def load_mtcnn(name: str, path: str | Path | None = None) -> nn.Module:
    """The MTCNN network ``name`` with its pretrained weights, in eval mode.

    Args:
        name: ``"pnet"``, ``"rnet"`` or ``"onet"``.
        path: A state dict in facenet-pytorch's layout (default: the one bundled in its wheel,
            :func:`mtcnn_weights_path`). Loaded with ``weights_only=True``.

    Returns:
        :class:`PNet`, :class:`RNet` or :class:`ONet`, every parameter loaded (strict).

    Raises:
        ValueError: unknown ``name``, or a state dict whose keys or shapes do not match.
        ModuleNotFoundError / FileNotFoundError: see :func:`mtcnn_weights_path`.
    """
    _check_name(name)
    cls, flat_layer, flat_shape = MTCNN_NETS[name]
    state = torch.load(path or mtcnn_weights_path(name), map_location="cpu", weights_only=True)
    if flat_layer is not None and flat_shape is not None and f"{flat_layer}.weight" in state:
        c, h, w = flat_shape
        weight = state[f"{flat_layer}.weight"]
        if weight.shape[1:] != (c * h * w,):
            raise ValueError(f"{name}: {flat_layer}.weight has shape {tuple(weight.shape)}, "
                             f"expected [*, {c * h * w}]")
        # upstream column (w', h', c') -> ours (c', h', w'), see the module docstring
        state = dict(state)
        state[f"{flat_layer}.weight"] = (weight.reshape(-1, w, h, c).permute(0, 3, 2, 1)
                                         .reshape(-1, c * h * w).contiguous())
    model = cls()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{name}: the state dict does not match the MTCNN architecture: "
                         f"{exc}") from None
    return model.eval()


def mtcnn_normalize(images: torch.Tensor) -> torch.Tensor:
    """MTCNN's input normalisation: RGB values in ``[0, 255]`` -> ``(x - 127.5) / 128``.

    Args:
        images: ``[B, 3, H, W]`` (any real dtype), RGB in ``[0, 255]``.

    Raises:
        ValueError: not a 4-D tensor with 3 channels.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] RGB, got shape {tuple(images.shape)}")
    return (images.float() - 127.5) * 0.0078125
