"""The image pipeline of METHOD.md section 0.

Resize so the shorter side is ``R`` with nearest interpolation (images too, as the reference
does), center-crop ``R x R``, scale to ``[0, 1]`` and normalise with the ImageNet mean and
standard deviation. Labels go through the same resize and crop. Sizes and offsets follow
torchvision's ``Resize(R)`` and ``CenterCrop(R)`` exactly, so inputs match the reference's
pixel for pixel; Pascal VOC instead resizes straight to ``R x R``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
_INVERSE_STD = torch.tensor([1 / value for value in IMAGENET_STD]).view(3, 1, 1)
_NEGATED_MEAN = torch.tensor([-value for value in IMAGENET_MEAN]).view(3, 1, 1)


def shorter_side_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """``(width, height)`` after resizing the shorter side to ``resolution`` (torchvision's rule)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL crop box of the centred ``size x size`` square (torchvision's rounding)."""
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return left, top, left + size, top + size


def resize_and_crop(image: Image.Image, resolution: int, square_resize: bool = False) -> Image.Image:
    """Nearest resize (shorter side, or straight to a square) then center crop."""
    if square_resize:
        return image.resize((resolution, resolution), Image.Resampling.NEAREST)
    size = shorter_side_size(image.width, image.height, resolution)
    resized = image.resize(size, Image.Resampling.NEAREST)
    return resized.crop(center_crop_box(resized.width, resized.height, resolution))


def pixels(image: Image.Image) -> torch.Tensor:
    """RGB ``PIL`` image to ``uint8 [3, H, W]``: what datasets hand the loader (a quarter of
    the bytes of floats to copy to the GPU)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def normalise_pixels(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` to normalised float32 on ``device`` (where it already is by
    default): copied as bytes, scaled to [0, 1] and normalised there, with the ImageNet mean
    and std, in the reference's arithmetic (ToTensor, then Normalize)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    scaled = images.float() / 255.0
    return (scaled - _MEAN.to(scaled.device)) / _STD.to(scaled.device)


def normalise(image: Image.Image) -> torch.Tensor:
    """RGB ``PIL`` image to a normalised float tensor ``[3, H, W]``."""
    return normalise_pixels(pixels(image))


def denormalise_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised ``[B, 3, H, W]`` back to ``uint8 [B, H, W, 3]`` RGB.

    Truncates like torchvision's ``to_pil_image``, which the reference uses to give the dense
    CRF its image, so the CRF sees the same pixels.
    """
    return denormalised_pixels(images.detach().cpu()).numpy()


def denormalised_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised ``[B, 3, H, W]`` back to ``uint8 [B, H, W, 3]`` RGB where they are, in the
    arithmetic of :func:`denormalise_to_uint8`."""
    # The reference's arithmetic, step for step: Normalize(0, 1 / std), Normalize(-mean, 1),
    # then mul(255).byte(). x * std + mean rounds differently and moves some pixels by one.
    rgb = images.detach().float() / _INVERSE_STD.to(images.device)
    rgb = rgb - _NEGATED_MEAN.to(images.device)
    return (rgb.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)


def label_tensor(label: Image.Image, ignore_values: tuple[int, ...] = (255,)) -> torch.Tensor:
    """Single-channel label image to ``int64 [H, W]`` with ignored values as ``-1``."""
    array = torch.from_numpy(np.asarray(label, dtype=np.int64).copy())
    for value in ignore_values:
        array[array == value] = -1
    return array
