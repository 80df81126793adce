"""Image augmentations: the two asymmetric SSL views and the downstream train/test pipelines.

Every pipeline starts by converting the image to 3-channel RGB, so greyscale datasets
(FashionMNIST, the greyscale images inside Caltech-101) feed the same 3-channel backbone, and
ends with ``ToTensor`` + ImageNet ``Normalize``: ``x = (pixel / 255 - mean) / std`` per channel,
giving a float tensor of shape ``(3, img_size, img_size)``.

Pretext views follow BYOL's asymmetric recipe, as BiSSL (arXiv 2410.02387) uses it: both
views take a random resized crop, a horizontal flip (p 0.5), colour jitter (0.4, 0.4, 0.2, 0.1)
applied with p 0.8 and grayscale with p 0.2; view 1 is always blurred (sigma in [0.1, 2]), view 2
is blurred with p 0.1 and solarised with p 0.2.

Speed (issue 9): every step works on the PIL image; only the last one builds a tensor. The blur is
PIL's ``ImageFilter.GaussianBlur`` (as the original BiSSL code, lightly and the BYOL/SimCLR
reference pipelines): an untruncated Gaussian of standard deviation sigma done with three box
filters, 4-8x faster than torchvision's tensor convolution and, unlike it, not slowed down by
torch's intra-op threads when other processes share the cores. ``ToNormalizedTensor`` fuses
``ToTensor`` and ``Normalize`` into one numpy expression (no torch kernels, hence no thread pool).

A note on the crop: the original code passed ``--img-crop-min-ratio`` as the *aspect-ratio*
range ``ratio=(min, 1)`` of ``RandomResizedCrop`` (leaving the area scale at torchvision's
default (0.08, 1)). That was a mistake; here it is the minimum of the area *scale*,
``scale=(crop_min_scale, 1)``, and the aspect ratio keeps torchvision's default (3/4, 4/3).
``crop_as_original=True`` (``--crop-as-original 1``) builds the original's crop instead, in
every pipeline that crops: the published numbers and weights were produced with it.

All transforms are plain classes (no lambdas) so DataLoader workers can pickle them, and all
randomness comes from torch's global CPU generator, so ``torch.manual_seed`` makes them repeatable
(``source.data.loader`` reseeds it per sample, which makes a run independent of the worker layout).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter
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


class GaussianBlur:
    """Gaussian blur of a PIL image with a standard deviation drawn uniformly from ``sigma``.

    ``sigma ~ U[sigma[0], sigma[1]]`` (one ``torch`` draw, as ``torchvision.transforms.GaussianBlur``),
    then ``img.filter(ImageFilter.GaussianBlur(radius=sigma))``: PIL's ``radius`` IS the standard
    deviation. The kernel is not truncated (the original BiSSL pipeline's blur); PIL approximates
    it with three extended box filters (Gwosdek et al., 2011), within a few grey levels of the
    exact Gaussian, and replicates the edge pixels at the border. Wrap it in ``RandomApply`` for a
    blur probability.
    """

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA) -> None:
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must be a range 0 < min <= max, got {sigma!r}")
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class ToNormalizedTensor:
    """``ToTensor`` + ``Normalize`` in one numpy expression: PIL image ``(H, W, C)`` uint8 ->
    float32 tensor ``(C, H, W)`` with ``x = (pixel / 255 - mean) / std`` per channel.

    Equal to ``T.Compose([T.ToTensor(), T.Normalize(mean, std)])`` up to float rounding (1e-6);
    it allocates one float array instead of four and runs no torch kernel, so torch's intra-op
    threads never enter the data pipeline.
    """

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        # x * scale + shift == (x / 255 - mean) / std
        self._scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float64))).astype(np.float32)
        self._shift = (-np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)).astype(np.float32)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = np.asarray(img)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.shape[2] != len(self.mean):
            raise ValueError(f"image has {pixels.shape[2]} channels, normalisation expects {len(self.mean)}")
        chw = np.empty((pixels.shape[2], pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        np.multiply(pixels.transpose(2, 0, 1), self._scale[:, None, None], out=chw, casting="unsafe")
        chw += self._shift[:, None, None]
        return torch.from_numpy(chw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _check_sizes(img_size: int, crop_min_scale: float | None = None) -> None:
    if not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if crop_min_scale is not None and not 0.0 < crop_min_scale <= 1.0:
        raise ValueError(f"crop_min_scale must be in (0, 1], got {crop_min_scale!r}")


def _normalize() -> list[Callable]:
    return [ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)]


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
        T.RandomApply([GaussianBlur(BLUR_SIGMA)], p=blur_p),
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
