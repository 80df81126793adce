"""Image augmentations: the two asymmetric SSL views and the downstream train/test pipelines.

Every pipeline starts by converting the image to 3-channel RGB, so greyscale datasets
(FashionMNIST, the greyscale images inside Caltech-101) feed the same 3-channel backbone, and
ends with ``ToTensor`` + ImageNet ``Normalize``: ``x = (pixel / 255 - mean) / std`` per channel,
giving a float tensor of shape ``(3, img_size, img_size)``.

Pretext views follow BYOL's asymmetric recipe, as BiSSL (arXiv 2410.02387) uses it: both
views take a random resized crop, a horizontal flip (p 0.5), colour jitter (0.4, 0.4, 0.2, 0.1)
applied with p 0.8 and grayscale with p 0.2; view 1 is always blurred (sigma in [0.1, 2], kernel
~10% of the image side), view 2 is blurred with p 0.1 and solarised with p 0.2.

A note on the crop: the original code passed ``--img-crop-min-ratio`` as the *aspect-ratio*
range ``ratio=(min, 1)`` of ``RandomResizedCrop`` (leaving the area scale at torchvision's
default (0.08, 1)). That was a mistake; here it is the minimum of the area *scale*,
``scale=(crop_min_scale, 1)``, and the aspect ratio keeps torchvision's default (3/4, 4/3).
``crop_as_original=True`` (``--crop-as-original 1``) builds the original's crop instead, in
every pipeline that crops: the published numbers and weights were produced with it.

All transforms are plain classes (no lambdas) so DataLoader workers can pickle them, and all
randomness comes from torch's global generator, so ``torch.manual_seed`` makes them repeatable.
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Colour jitter strengths (brightness, contrast, saturation, hue) and probabilities of the
# BYOL/BiSSL recipe.
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
COLOR_JITTER_P = 0.8
GRAYSCALE_P = 0.2
HFLIP_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
# Blur probability and solarisation probability per view: the asymmetry of the two views.
VIEW1_BLUR_P, VIEW1_SOLARIZE_P = 1.0, 0.0
VIEW2_BLUR_P, VIEW2_SOLARIZE_P = 0.1, 0.2
# PIL's ImageOps.solarize default: invert every pixel value >= 128 (of 0..255).
SOLARIZE_THRESHOLD = 128
# Blur kernel side as a fraction of the image side (BYOL: 23 px at 224 px).
BLUR_KERNEL_FRACTION = 0.1
# The test-time resize keeps ImageNet's 224/256 centre-crop ratio.
CENTER_CROP_FRACTION = 0.875


class ToRGB:
    """Convert a PIL image of any mode to 3-channel RGB (greyscale is replicated to 3 channels)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"ToRGB expects a PIL image, got {type(img).__name__}")
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TwoViewTransform:
    """Apply two (different) random pipelines to the same image: ``img -> (view1, view2)``.

    Each view is a float tensor of shape ``(3, H, W)``. ``view1`` and ``view2`` are kept as
    attributes so the settings of each view can be inspected.
    """

    def __init__(self, view1: Callable, view2: Callable) -> None:
        self.view1 = view1
        self.view2 = view2

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(img), self.view2(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\nview1={self.view1},\nview2={self.view2})"


def blur_kernel_size(img_size: int) -> int:
    """Odd Gaussian-blur kernel side, about 10% of ``img_size`` and at least 3 (96 -> 9, 224 -> 23)."""
    return max(3, int(BLUR_KERNEL_FRACTION * img_size) // 2 * 2 + 1)


def _check_sizes(img_size: int, crop_min_scale: float | None = None) -> None:
    if not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if crop_min_scale is not None and not 0.0 < crop_min_scale <= 1.0:
        raise ValueError(f"crop_min_scale must be in (0, 1], got {crop_min_scale!r}")


def _normalize() -> list[Callable]:
    return [T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]


def random_resized_crop(img_size: int, crop_min_scale: float, crop_as_original: bool = False,
                        interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR) -> T.RandomResizedCrop:
    """The random resized crop of the training pipelines.

    Default: area ``scale=(crop_min_scale, 1)``, aspect ratio (3/4, 4/3), ``interpolation``.
    ``crop_as_original``: the original code's crop, ``RandomResizedCrop(img_size,
    ratio=(crop_min_scale, 1))`` -- area scale left at (0.08, 1), aspect ratio (width/height) in
    ``[crop_min_scale, 1]``, so only portrait crops -- bicubic with antialiasing, in its pretext
    and downstream pipelines alike.
    """
    if crop_as_original:
        return T.RandomResizedCrop(img_size, ratio=(crop_min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                                   antialias=True)
    return T.RandomResizedCrop(img_size, scale=(crop_min_scale, 1.0), interpolation=interpolation)


def _pretext_view(img_size: int, crop_min_scale: float, blur_p: float, solarize_p: float,
                  crop_as_original: bool = False) -> T.Compose:
    steps: list[Callable] = [
        ToRGB(),
        # Bicubic, as in the original pre-training pipeline.
        random_resized_crop(img_size, crop_min_scale, crop_as_original, T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=HFLIP_P),
        T.RandomApply([T.ColorJitter(*COLOR_JITTER)], p=COLOR_JITTER_P),
        T.RandomGrayscale(p=GRAYSCALE_P),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(img_size), sigma=BLUR_SIGMA)], p=blur_p),
    ]
    if solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p))
    return T.Compose(steps + _normalize())


def pretext_transform(img_size: int, crop_min_scale: float, crop_as_original: bool = False) -> TwoViewTransform:
    """The two asymmetric SSL views of one image (see the module docstring for the recipe).

    Args:
        img_size: side of the square output views.
        crop_min_scale: minimum area fraction of the random resized crop,
            ``scale=(crop_min_scale, 1)`` (``--img-crop-min-ratio``; NOT an aspect ratio).
        crop_as_original: build the original code's crop instead (:func:`random_resized_crop`).

    Returns:
        ``img -> (view1, view2)``, each a normalised tensor of shape ``(3, img_size, img_size)``.
    """
    _check_sizes(img_size, crop_min_scale)
    return TwoViewTransform(
        _pretext_view(img_size, crop_min_scale, VIEW1_BLUR_P, VIEW1_SOLARIZE_P, crop_as_original),
        _pretext_view(img_size, crop_min_scale, VIEW2_BLUR_P, VIEW2_SOLARIZE_P, crop_as_original),
    )


def downstream_train_transform(img_size: int, crop_min_scale: float, crop_as_original: bool = False) -> T.Compose:
    """Downstream training augmentation: RGB, random resized crop (area scale in
    ``[crop_min_scale, 1]``, or the original's crop with ``crop_as_original``), horizontal flip,
    normalise -> tensor ``(3, img_size, img_size)``."""
    _check_sizes(img_size, crop_min_scale)
    return T.Compose(
        [ToRGB(), random_resized_crop(img_size, crop_min_scale, crop_as_original), T.RandomHorizontalFlip(p=HFLIP_P)]
        + _normalize()
    )


def downstream_test_transform(img_size: int) -> T.Compose:
    """Deterministic evaluation pipeline: RGB, resize the short side to ``int(img_size / 0.875)``,
    centre crop ``img_size``, normalise -> tensor ``(3, img_size, img_size)``."""
    _check_sizes(img_size)
    return T.Compose(
        [ToRGB(), T.Resize(int(img_size / CENTER_CROP_FRACTION)), T.CenterCrop(img_size)] + _normalize()
    )
