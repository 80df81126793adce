"""Image augmentations: the two asymmetric SSL views and the downstream train/test pipelines.

Every pipeline starts by converting the image to 3-channel RGB, so greyscale datasets
(FashionMNIST, the greyscale images inside Caltech-101) feed the same 3-channel backbone, and
ends with ``ToTensor`` + ImageNet ``Normalize``: ``x = (pixel / 255 - mean) / std`` per channel,
giving a float tensor of shape ``(3, img_size, img_size)``.

Pretext views follow BYOL's asymmetric recipe, as BiSSL (arXiv 2410.02387) uses it: both
views take a random resized crop, a horizontal flip (p 0.5), colour jitter (0.4, 0.4, 0.2, 0.1)
applied with p 0.8 and grayscale with p 0.2; view 1 is always blurred (sigma in [0.1, 2]), view 2
is blurred with p 0.1 and solarised with p 0.2.

Speed (issue 9): a pretext view is one :class:`PretextView`, not a chain of torchvision
transforms. It makes the PIL calls torchvision's functional ops make, so the pixels are the same
for the same random choices, but draws all of a view's random numbers in one torch call and
skips the per-op wrappers: 0.48 ms for two 32 px views of a FashionMNIST image against 1.2 ms for
the torchvision chain (one core), where Python overhead, not pixel work, was most of the cost.
The blur is PIL's ``ImageFilter.GaussianBlur`` (as the original BiSSL code, lightly and the
BYOL/SimCLR reference pipelines): an untruncated Gaussian of standard deviation sigma done with
three box filters, 4-8x faster than torchvision's tensor convolution and, unlike it, not slowed
down by torch's intra-op threads when other processes share the cores. ``ToNormalizedTensor``
fuses ``ToTensor`` and ``Normalize`` into one numpy expression (no torch kernels, hence no
thread pool).

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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
# torchvision's RandomResizedCrop defaults: area fraction and aspect ratio (width / height).
TORCHVISION_CROP_SCALE = (0.08, 1.0)
TORCHVISION_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# The pretext views resize their crops bicubically, as the original pre-training pipeline.
BICUBIC = Image.Resampling.BICUBIC
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
        return self.from_array(np.asarray(img))

    def from_array(self, pixels: np.ndarray) -> torch.Tensor:
        """The same for a uint8 array ``(H, W, C)`` or ``(H, W)``."""
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


def crop_ranges(crop_min_scale: float, crop_as_original: bool = False) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(area scale, aspect ratio)`` ranges of the training crops.

    Default: area ``scale=(crop_min_scale, 1)``, aspect ratio torchvision's (3/4, 4/3).
    ``crop_as_original``: the original code's crop, ``RandomResizedCrop(img_size,
    ratio=(crop_min_scale, 1))`` -- area scale left at torchvision's (0.08, 1), aspect ratio
    (width/height) in ``[crop_min_scale, 1]``, so only portrait crops.
    """
    if crop_as_original:
        return TORCHVISION_CROP_SCALE, (crop_min_scale, 1.0)
    return (crop_min_scale, 1.0), TORCHVISION_CROP_RATIO


def random_resized_crop(img_size: int, crop_min_scale: float, crop_as_original: bool = False) -> T.RandomResizedCrop:
    """The random resized crop of the downstream training pipeline: :func:`crop_ranges`, bilinear,
    or bicubic with ``crop_as_original`` (the original's, in its pretext and downstream pipelines
    alike)."""
    scale, ratio = crop_ranges(crop_min_scale, crop_as_original)
    interpolation = T.InterpolationMode.BICUBIC if crop_as_original else T.InterpolationMode.BILINEAR
    return T.RandomResizedCrop(img_size, scale=scale, ratio=ratio, interpolation=interpolation, antialias=True)


@dataclass(frozen=True)
class ViewParams:
    """The random choices of one pretext view, as :meth:`PretextView.draw` makes them."""

    box: tuple[int, int, int, int]  # the crop in the source image: (top, left, height, width)
    flip: bool
    jitter: tuple[tuple[str, float], ...]  # (operation, factor) in the order applied; () = no jitter
    grayscale: bool
    blur_sigma: float | None  # None = no blur
    solarize: bool


def resized_crop_box(uniforms: Sequence[float], width: int, height: int, scale: tuple[float, float],
                     ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params``'s sampling, fed ``2 * CROP_TRIES + 2`` uniforms in [0, 1).

    Up to ``CROP_TRIES`` tries draw an area fraction ``s ~ U(scale)`` and an aspect ratio
    ``r = exp(U(log ratio))``; the first crop ``w = round(sqrt(s A r))``, ``h = round(sqrt(s A / r))``
    that fits is placed uniformly (the last two uniforms); if none fits, the centre crop of the
    whole image clamped to ``ratio``. Returns ``(top, left, height, width)``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(CROP_TRIES):
        target_area = area * (scale[0] + uniforms[2 * attempt] * (scale[1] - scale[0]))
        aspect = math.exp(log_low + uniforms[2 * attempt + 1] * (log_high - log_low))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniforms[2 * CROP_TRIES] * (height - h + 1))
            left = int(uniforms[2 * CROP_TRIES + 1] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _brightness(img: Image.Image, factor: float) -> Image.Image:
    return Image.blend(Image.new("RGB", img.size, 0), img, factor)  # as ImageEnhance.Brightness


def _contrast(img: Image.Image, factor: float) -> Image.Image:
    # As ImageEnhance.Contrast: blend with the grey of the image's mean luma, rounded.
    luma = np.frombuffer(img.convert("L").tobytes(), dtype=np.uint8)
    mean = int(int(luma.sum(dtype=np.int64)) / luma.size + 0.5)
    return Image.blend(Image.new("RGB", img.size, (mean, mean, mean)), img, factor)


def _saturation(img: Image.Image, factor: float) -> Image.Image:
    return Image.blend(img.convert("L").convert("RGB"), img, factor)  # as ImageEnhance.Color


def _hue(img: Image.Image, factor: float) -> Image.Image:
    # As torchvision's PIL hue: shift the 8-bit HSV hue by int(factor * 255), wrapping around.
    hsv = np.frombuffer(img.convert("HSV").tobytes(), dtype=np.uint8).copy()
    hsv[0::3] += np.uint8(int(factor * 255) % 256)
    return Image.frombytes("HSV", img.size, hsv.tobytes()).convert("RGB")


JITTER_OPERATIONS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "hue": _hue}
# Uniforms one view draws, in this order: the crop's tries and position, flip, jitter applied,
# jitter order (4), jitter factors (4), grayscale, blur applied, sigma, solarise.
CROP_TRIES = 10
_FLIP = 2 * CROP_TRIES + 2
_JITTER, _ORDER, _FACTORS = _FLIP + 1, _FLIP + 2, _FLIP + 6
_GRAYSCALE, _BLUR, _SIGMA, _SOLARIZE = _FLIP + 10, _FLIP + 11, _FLIP + 12, _FLIP + 13
VIEW_UNIFORMS = _SOLARIZE + 1


class PretextView:
    """One random SSL view of an image: random resized crop, horizontal flip, colour jitter (in a
    random order, applied with ``jitter_p``), grayscale, Gaussian blur, solarisation, normalisation
    -> float tensor ``(3, img_size, img_size)``.

    The same distribution and the same pixels as the torchvision pipeline ``RandomResizedCrop,
    RandomHorizontalFlip, RandomApply([ColorJitter]), RandomGrayscale, RandomApply([blur]),
    RandomSolarize, ToTensor, Normalize`` on PIL images (the tests compare both, pixel for pixel
    for the same random choices, and the distributions of those choices), at 0.4x (32 px) to 0.6x
    (96 px) its cost: torchvision draws ~25 random numbers one torch call at a time and wraps every
    PIL call in checks, which at these sizes costs more than the pixel work. Here :meth:`draw` takes all of a
    view's random numbers from torch's generator in one call (so ``torch.manual_seed`` still makes
    a view repeatable) and :meth:`apply` makes the PIL calls torchvision's functional ops make.
    """

    def __init__(self, img_size: int, scale: tuple[float, float], ratio: tuple[float, float], *, blur_p: float,
                 solarize_p: float, flip_p: float = HFLIP_P, jitter: tuple[float, float, float, float] = COLOR_JITTER,
                 jitter_p: float = COLOR_JITTER_P, grayscale_p: float = GRAYSCALE_P,
                 sigma: tuple[float, float] = BLUR_SIGMA, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        _check_sizes(img_size)
        if not (0.0 < scale[0] <= scale[1] and 0.0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale and ratio must be ranges 0 < min <= max, got {scale!r} and {ratio!r}")
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must be a range 0 < min <= max, got {sigma!r}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p),
                        ("solarize_p", solarize_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        brightness, contrast, saturation, hue = jitter
        if min(jitter) < 0 or hue > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 with hue <= 0.5, got {jitter!r}")
        self.img_size = img_size
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.flip_p, self.jitter_p, self.grayscale_p = flip_p, jitter_p, grayscale_p
        self.blur_p, self.solarize_p, self.sigma = blur_p, solarize_p, (float(sigma[0]), float(sigma[1]))
        # Factor ranges as torchvision's ColorJitter: [max(0, 1 - s), 1 + s], hue [-h, h].
        self.jitter_ranges = {"brightness": (max(0.0, 1 - brightness), 1 + brightness),
                              "contrast": (max(0.0, 1 - contrast), 1 + contrast),
                              "saturation": (max(0.0, 1 - saturation), 1 + saturation), "hue": (-hue, hue)}
        self.normalize = ToNormalizedTensor(mean, std)

    def draw(self, width: int, height: int) -> ViewParams:
        """The random choices for a ``width`` x ``height`` source image (one torch draw)."""
        u = torch.rand(VIEW_UNIFORMS, dtype=torch.float64).tolist()
        jitter: tuple[tuple[str, float], ...] = ()
        if u[_JITTER] < self.jitter_p:
            # A uniformly random order of the four operations (as torch.randperm(4)), each with its factor.
            names = list(self.jitter_ranges)
            order = sorted(range(len(names)), key=u[_ORDER:_ORDER + len(names)].__getitem__)
            factors = {name: low + u[_FACTORS + k] * (high - low) for k, (name, (low, high)) in enumerate(self.jitter_ranges.items())}
            jitter = tuple((names[k], factors[names[k]]) for k in order)
        return ViewParams(
            box=resized_crop_box(u, width, height, self.scale, self.ratio),
            flip=u[_FLIP] < self.flip_p,
            jitter=jitter,
            grayscale=u[_GRAYSCALE] < self.grayscale_p,
            blur_sigma=self.sigma[0] + u[_SIGMA] * (self.sigma[1] - self.sigma[0]) if u[_BLUR] < self.blur_p else None,
            solarize=u[_SOLARIZE] < self.solarize_p,
        )

    def apply(self, img: Image.Image, params: ViewParams) -> np.ndarray:
        """The view of an RGB image for given choices, as uint8 pixels ``(img_size, img_size, 3)``."""
        top, left, height, width = params.box
        img = img.crop((left, top, left + width, top + height)).resize((self.img_size, self.img_size), BICUBIC)
        if params.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for name, factor in params.jitter:
            img = JITTER_OPERATIONS[name](img, factor)
        if params.grayscale:
            img = img.convert("L").convert("RGB")
        if params.blur_sigma is not None:
            # PIL's radius IS the standard deviation; see the module docstring.
            img = img.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
        pixels = np.asarray(img)
        if params.solarize:  # as ImageOps.solarize: invert every value >= the threshold
            pixels = np.where(pixels >= SOLARIZE_THRESHOLD, 255 - pixels, pixels)
        return pixels

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = ToRGB()(img)
        return self.normalize.from_array(self.apply(img, self.draw(*img.size)))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip_p={self.flip_p}, jitter={self.jitter_ranges}, jitter_p={self.jitter_p}, "
                f"grayscale_p={self.grayscale_p}, blur_p={self.blur_p}, sigma={self.sigma}, "
                f"solarize_p={self.solarize_p}, normalize={self.normalize})")


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
    scale, ratio = crop_ranges(crop_min_scale, crop_as_original)
    return TwoViewTransform(
        PretextView(img_size, scale, ratio, blur_p=VIEW1_BLUR_P, solarize_p=VIEW1_SOLARIZE_P),
        PretextView(img_size, scale, ratio, blur_p=VIEW2_BLUR_P, solarize_p=VIEW2_SOLARIZE_P),
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


# Uniforms one downstream view draws, in this order: the crop's tries and position, flip.
# Half-width in pixels of PIL's resampling filters at scale 1 (Pillow's bilinear, bicubic and lanczos kernels).
_FILTER_SUPPORT = {Image.Resampling.BILINEAR: 1.0, Image.Resampling.BICUBIC: 2.0, Image.Resampling.LANCZOS: 3.0}
DOWNSTREAM_UNIFORMS = _FLIP + 1


@dataclass(frozen=True)
class DownstreamParams:
    """The random choices of one downstream training view, as :meth:`DownstreamView.draw` makes them."""

    box: tuple[int, int, int, int]  # the crop in the SOURCE image: (top, left, height, width)
    flip: bool


class DownstreamView:
    """The downstream training augmentation fused like :class:`PretextView`: random resized crop,
    horizontal flip (p ``flip_p``), normalisation -> float tensor ``(3, img_size, img_size)``.

    The same distribution of choices and the same pixels as :func:`downstream_train_transform`
    (``RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize`` on PIL images) for the same
    choices; the tests compare both bit for bit. :meth:`draw` takes all of a sample's random
    numbers from torch's generator in one call (so ``torch.manual_seed``, or
    ``source.data.loader``'s per-sample seeds, make it repeatable).

    It also works on uint8 arrays ``(H, W, 3)`` (:meth:`from_array`), the images of a decoded-image
    cache (``source.data.decoded_cache``), which may be a downscaled copy of a ``source_size``
    original: the crop box is then drawn in the original's pixel grid, exactly as on the original
    (same choices, same distribution), and resampled from the copy's corresponding fractional box.
    Without downscaling (the copy is the original) the pixels are those of the original, bit for bit.
    """

    def __init__(self, img_size: int, scale: tuple[float, float], ratio: tuple[float, float], *,
                 interpolation: Image.Resampling = Image.Resampling.BILINEAR, flip_p: float = HFLIP_P,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        _check_sizes(img_size)
        if not (0.0 < scale[0] <= scale[1] and 0.0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale and ratio must be ranges 0 < min <= max, got {scale!r} and {ratio!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p!r}")
        self.img_size, self.flip_p, self.interpolation = img_size, flip_p, Image.Resampling(interpolation)
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.normalize = ToNormalizedTensor(mean, std)

    def draw(self, width: int, height: int) -> DownstreamParams:
        """The random choices for a ``width`` x ``height`` source image (one torch draw)."""
        u = torch.rand(DOWNSTREAM_UNIFORMS, dtype=torch.float64).tolist()
        return DownstreamParams(box=resized_crop_box(u, width, height, self.scale, self.ratio), flip=u[_FLIP] < self.flip_p)

    def apply(self, img: Image.Image, params: DownstreamParams) -> np.ndarray:
        """The view of an RGB PIL image for given choices, as uint8 pixels ``(img_size, img_size, 3)``."""
        top, left, height, width = params.box
        img = img.crop((left, top, left + width, top + height)).resize((self.img_size, self.img_size), self.interpolation)
        pixels = np.asarray(img)
        return pixels[:, ::-1] if params.flip else pixels  # a flipped view, as Image.FLIP_LEFT_RIGHT

    def apply_array(self, pixels: np.ndarray, params: DownstreamParams, source_size: tuple[int, int] | None = None) -> np.ndarray:
        """The same for uint8 RGB pixels ``(H, W, 3)`` that are the source image resized from
        ``source_size = (width, height)`` (None: the source itself); ``params.box`` is in the source's grid."""
        height_here, width_here = pixels.shape[:2]
        if source_size is None or tuple(source_size) == (width_here, height_here):
            top, left, height, width = params.box
            crop = Image.fromarray(pixels[top:top + height, left:left + width])  # the same pixels as Image.crop
            out = np.asarray(crop.resize((self.img_size, self.img_size), self.interpolation))
            return out[:, ::-1] if params.flip else out
        # PIL resamples a fractional box directly (its filter covers the box's true extent), so the
        # crop keeps the exact position and size drawn on the source instead of rounding to the copy's grid.
        fx, fy = width_here / source_size[0], height_here / source_size[1]
        top, left, height, width = params.box
        x0, y0, x1, y1 = left * fx, top * fy, (left + width) * fx, (top + height) * fy
        # Only the pixels the filter reads (its support, widened by the reduction factor) become a PIL
        # image: copying the whole stored image would cost more than the resampling itself.
        support = _FILTER_SUPPORT[self.interpolation] * max(1.0, (x1 - x0) / self.img_size, (y1 - y0) / self.img_size) + 1
        c0, r0 = max(0, math.floor(x0 - support)), max(0, math.floor(y0 - support))
        c1, r1 = min(width_here, math.ceil(x1 + support)), min(height_here, math.ceil(y1 + support))
        region = Image.fromarray(pixels[r0:r1, c0:c1])
        out = np.asarray(region.resize((self.img_size, self.img_size), self.interpolation, box=(x0 - c0, y0 - r0, x1 - c0, y1 - r0)))
        return out[:, ::-1] if params.flip else out

    def from_array(self, pixels: np.ndarray, source_size: tuple[int, int] | None = None) -> torch.Tensor:
        """One random view of uint8 RGB pixels ``(H, W, 3)`` (see :meth:`apply_array`) -> ``(3, img_size, img_size)``."""
        width, height = source_size if source_size is not None else (pixels.shape[1], pixels.shape[0])
        return self.normalize.from_array(self.apply_array(pixels, self.draw(width, height), source_size))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = ToRGB()(img)
        return self.normalize.from_array(self.apply(img, self.draw(*img.size)))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.name}, flip_p={self.flip_p}, normalize={self.normalize})")


def downstream_train_view(img_size: int, crop_min_scale: float, crop_as_original: bool = False) -> DownstreamView:
    """:func:`downstream_train_transform` as one :class:`DownstreamView`: the same crop ranges and
    interpolation (bicubic with ``crop_as_original``, else bilinear), the same pixels for the same choices."""
    _check_sizes(img_size, crop_min_scale)
    scale, ratio = crop_ranges(crop_min_scale, crop_as_original)
    interpolation = BICUBIC if crop_as_original else Image.Resampling.BILINEAR
    return DownstreamView(img_size, scale, ratio, interpolation=interpolation)
