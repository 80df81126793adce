"""Augmentations: shapes, normalisation, crop scale (not ratio), view asymmetry, seeding, pickling;
the fused pretext view against torchvision's ops (same pixels for the same choices, same
distribution of choices), the PIL blur against an exact Gaussian."""
from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import ndimage, stats
from torchvision import transforms as T
from torchvision.transforms import functional as F

from source.data.transforms import (
    DOWNSTREAM_UNIFORMS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIEW_UNIFORMS,
    DownstreamView,
    PretextView,
    ToNormalizedTensor,
    TwoViewTransform,
    ViewParams,
    downstream_test_transform,
    downstream_train_transform,
    downstream_train_view,
    pretext_transform,
    resized_crop_box,
)

torch.set_num_threads(1)


def _random_image(mode: str, size: tuple[int, int] = (37, 29), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def _steps(compose: T.Compose) -> list:
    """All transforms of a Compose, with the contents of RandomApply flattened in."""
    found = []
    for step in compose.transforms:
        found.append(step)
        if isinstance(step, T.RandomApply):
            found.extend(step.transforms)
    return found


def _only(compose: T.Compose, kind: type):
    matches = [step for step in _steps(compose) if isinstance(step, kind)]
    assert len(matches) == 1, f"expected one {kind.__name__} in {compose}"
    return matches[0]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("img_size", [16, 32])
def test_output_shapes(mode: str, img_size: int) -> None:
    image = _random_image(mode)
    view1, view2 = pretext_transform(img_size, 0.5)(image)
    for view in (view1, view2, downstream_train_transform(img_size, 0.5)(image), downstream_test_transform(img_size)(image)):
        assert view.shape == (3, img_size, img_size)
        assert view.dtype == torch.float32
        assert torch.isfinite(view).all()


def test_greyscale_input_gives_identical_channels_before_normalisation() -> None:
    out = downstream_test_transform(16)(_random_image("L"))
    pixels = out * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)


def test_imagenet_normalisation() -> None:
    # A constant image at the ImageNet mean colour maps to ~0; white maps to (1 - mean) / std.
    mean_colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    out = downstream_test_transform(16)(Image.new("RGB", (20, 20), mean_colour))
    assert out.abs().max() < 0.01
    white = downstream_test_transform(16)(Image.new("RGB", (20, 20), (255, 255, 255)))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(white.mean(dim=(1, 2)), expected, atol=1e-4)


def test_normalised_statistics_of_random_views() -> None:
    # Uniform random pixels (mean 0.5, std 1/sqrt(12) ~ 0.289); the image already has the
    # resize target's side int(48 / 0.875) = 54, so only the centre crop touches it.
    image = _random_image("RGB", (54, 54))
    out = downstream_test_transform(48)(image)
    expected_mean = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    expected_std = 0.289 / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected_mean, atol=0.1)
    assert torch.allclose(out.std(dim=(1, 2)), expected_std, rtol=0.05)


@pytest.mark.parametrize("crop_min_scale", [0.08, 0.5])
def test_crop_minimum_is_area_scale_not_aspect_ratio(crop_min_scale: float) -> None:
    pretext = pretext_transform(32, crop_min_scale)
    for view in (pretext.view1, pretext.view2):
        assert view.scale == (crop_min_scale, 1.0) and view.img_size == 32
        assert view.ratio == pytest.approx((3 / 4, 4 / 3))  # torchvision's default aspect range
    crop = _only(downstream_train_transform(32, crop_min_scale), T.RandomResizedCrop)
    assert crop.scale == (crop_min_scale, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3)) and crop.size == (32, 32)


def test_view_asymmetry_and_shared_settings() -> None:
    pretext = pretext_transform(96, 0.5)
    assert isinstance(pretext, TwoViewTransform)
    assert (pretext.view1.blur_p, pretext.view1.solarize_p) == (1.0, 0.0)
    assert (pretext.view2.blur_p, pretext.view2.solarize_p) == (0.1, 0.2)
    for view in (pretext.view1, pretext.view2):
        assert isinstance(view, PretextView)
        assert view.jitter_p == 0.8 and view.grayscale_p == 0.2 and view.flip_p == 0.5 and view.sigma == (0.1, 2.0)
        expected = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
        assert list(view.jitter_ranges) == list(expected)
        for name, (low, high) in expected.items():
            assert view.jitter_ranges[name] == pytest.approx((low, high)), name
        assert tuple(view.normalize.mean) == IMAGENET_MEAN and tuple(view.normalize.std) == IMAGENET_STD


def _torchvision_view(img: Image.Image, params: ViewParams, img_size: int) -> np.ndarray:
    """The reference: torchvision's functional ops (what RandomResizedCrop, ColorJitter, ... call)
    applied with the given choices, and the original pipeline's PIL blur."""
    top, left, height, width = params.box
    img = F.resized_crop(img, top, left, height, width, [img_size, img_size], T.InterpolationMode.BICUBIC, antialias=True)
    if params.flip:
        img = F.hflip(img)
    operations = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
                  "saturation": F.adjust_saturation, "hue": F.adjust_hue}
    for name, factor in params.jitter:
        img = operations[name](img, factor)
    if params.grayscale:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if params.blur_sigma is not None:
        img = img.filter(ImageFilter.GaussianBlur(params.blur_sigma))
    if params.solarize:
        img = F.solarize(img, 128)
    return np.asarray(img)


def test_view_pixels_equal_torchvision_ops_for_the_same_choices() -> None:
    """Bit for bit, over 400 random images and draws (blur and solarise at p 0.5 so that every
    combination occurs), and the normalised tensor equals ToTensor + Normalize."""
    rng = np.random.default_rng(1)
    view = PretextView(24, (0.08, 1.0), (3 / 4, 4 / 3), blur_p=0.5, solarize_p=0.5)
    reference_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(0)
    seen = {"jitter": 0, "grayscale": 0, "blur": 0, "solarize": 0, "flip": 0}
    for _ in range(400):
        size = (int(rng.integers(8, 64)), int(rng.integers(8, 64)))
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        params = view.draw(*image.size)
        expected = _torchvision_view(image, params, 24)
        assert np.array_equal(view.apply(image, params), expected), params
        seen["jitter"] += bool(params.jitter)
        seen["grayscale"] += params.grayscale
        seen["blur"] += params.blur_sigma is not None
        seen["solarize"] += params.solarize
        seen["flip"] += params.flip
    assert min(seen.values()) > 50, seen
    torch.manual_seed(5)
    image = _random_image("RGB", (40, 30))
    out = view(image)
    torch.manual_seed(5)
    expected = reference_tensor(Image.fromarray(_torchvision_view(image, view.draw(40, 30), 24)))
    assert out.shape == (3, 24, 24) and torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(("size", "scale", "ratio"), [
    ((28, 28), (0.08, 1.0), (3 / 4, 4 / 3)),  # FashionMNIST, the default crop
    ((56, 40), (0.5, 1.0), (3 / 4, 4 / 3)),
    ((40, 56), (0.08, 1.0), (0.2, 1.0)),  # --crop-as-original's portrait-only range
    ((90, 12), (0.3, 1.0), (3 / 4, 4 / 3)),  # a strip: every try can fail, the fallback crop
])
def test_crop_boxes_follow_torchvision_distribution(size, scale, ratio) -> None:
    """Our one-draw sampling against RandomResizedCrop.get_params: two samples of 4000 boxes, a
    two-sample Kolmogorov-Smirnov test per coordinate and on the area (p > 1e-4 each), and every
    box inside the image."""
    n = 4000
    image = Image.new("RGB", size)
    torch.manual_seed(0)
    ours = np.array([resized_crop_box(torch.rand(VIEW_UNIFORMS, dtype=torch.float64).tolist(), *size, scale, ratio)
                     for _ in range(n)])
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)])
    for column in range(4):
        assert stats.ks_2samp(ours[:, column], theirs[:, column]).pvalue > 1e-4, column
    assert stats.ks_2samp(ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3]).pvalue > 1e-4
    width, height = size
    assert np.all(ours[:, 0] + ours[:, 2] <= height) and np.all(ours[:, 1] + ours[:, 3] <= width) and ours.min() >= 0


def test_fallback_crop_equals_torchvision_when_every_try_fails() -> None:
    """A 200x10 strip with a tall-only ratio range: no try fits, both take the centre crop."""
    image = Image.new("RGB", (200, 10))
    torch.manual_seed(0)
    ours = resized_crop_box(torch.rand(VIEW_UNIFORMS, dtype=torch.float64).tolist(), 200, 10, (0.9, 1.0), (0.2, 0.3))
    assert ours == tuple(T.RandomResizedCrop.get_params(image, [0.9, 1.0], [0.2, 0.3])) == (0, 98, 10, 3)


def test_view_choices_follow_the_recipe() -> None:
    """Per-view probabilities (binomial bounds of 4.5 standard deviations over 4000 draws), uniform
    jitter orders and factors, and sigma uniform on [0.1, 2]."""
    pretext = pretext_transform(8, 0.5)
    n = 4000
    torch.manual_seed(0)
    for view, blur_p, solarize_p in ((pretext.view1, 1.0, 0.0), (pretext.view2, 0.1, 0.2)):
        draws = [view.draw(20, 20) for _ in range(n)]
        counts = {"flip": (sum(d.flip for d in draws), 0.5), "jitter": (sum(bool(d.jitter) for d in draws), 0.8),
                  "grayscale": (sum(d.grayscale for d in draws), 0.2),
                  "blur": (sum(d.blur_sigma is not None for d in draws), blur_p),
                  "solarize": (sum(d.solarize for d in draws), solarize_p)}
        for name, (count, p) in counts.items():
            assert abs(count - n * p) <= 4.5 * np.sqrt(n * p * (1 - p)), (name, count, p)
        sigmas = np.array([d.blur_sigma for d in draws if d.blur_sigma is not None])
        assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
        assert stats.kstest(sigmas, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-4
        jittered = [d.jitter for d in draws if d.jitter]
        orders = Counter(tuple(name for name, _ in jitter) for jitter in jittered)
        assert len(orders) == 24 and stats.chisquare(list(orders.values())).pvalue > 1e-4  # every order, equally often
        for name, (low, high) in view.jitter_ranges.items():
            factors = np.array([dict(jitter)[name] for jitter in jittered])
            assert stats.kstest(factors, stats.uniform(low, high - low).cdf).pvalue > 1e-4, name


def _smooth_image() -> np.ndarray:
    """A 40x48 RGB image with smooth gradients and one sharp-edged disc (natural-image-like)."""
    yy, xx = np.mgrid[0:40, 0:48]
    channels = [128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0), 255 * xx / 47.0, 255.0 * ((xx - 24) ** 2 + (yy - 20) ** 2 < 100)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _exact_gaussian(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Untruncated Gaussian (8 sigma) per channel, edges replicated like PIL's."""
    return np.stack([ndimage.gaussian_filter(pixels[..., c].astype(np.float64), sigma, mode="nearest", truncate=8.0)
                     for c in range(pixels.shape[-1])], -1)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 2.0])
def test_blur_matches_an_exact_gaussian_of_the_drawn_sigma(sigma: float) -> None:
    pixels = _smooth_image()[:, :40]
    view = PretextView(40, (0.08, 1.0), (3 / 4, 4 / 3), blur_p=1.0, solarize_p=0.0)
    only_blur = ViewParams(box=(0, 0, 40, 40), flip=False, jitter=(), grayscale=False, blur_sigma=sigma, solarize=False)
    out = view.apply(Image.fromarray(pixels), only_blur).astype(np.float64)
    # PIL's three box filters match the exact Gaussian to a fraction of a grey level on average
    # (a few levels at the disc's sharp edge); a 30% wrong sigma is off by 2-5x more.
    assert np.abs(out - _exact_gaussian(pixels, sigma)).mean() < 0.5
    assert np.abs(out - _exact_gaussian(pixels, sigma)).max() < 8
    assert np.abs(out - _exact_gaussian(pixels, 1.3 * sigma)).mean() > 0.7


def test_fused_to_tensor_normalize_equals_torchvision() -> None:
    reference = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for image in (_random_image("RGB", (37, 29)), Image.fromarray(_smooth_image())):
        ours = ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)(image)
        assert ours.shape == reference(image).shape and ours.dtype == torch.float32 and ours.is_contiguous()
        assert torch.allclose(ours, reference(image), atol=1e-5)
    grey = ToNormalizedTensor((0.5,), (0.25,))(_random_image("L"))
    assert torch.allclose(grey, T.Normalize((0.5,), (0.25,))(T.ToTensor()(_random_image("L"))), atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        ToNormalizedTensor()(_random_image("L"))


def test_seeded_determinism_and_randomness() -> None:
    image = _random_image("RGB", (48, 40))
    transform = pretext_transform(24, 0.3)
    torch.manual_seed(7)
    first = transform(image)
    torch.manual_seed(7)
    second = transform(image)
    torch.manual_seed(8)
    third = transform(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], third[0])
    assert not torch.equal(first[0], first[1])  # the two views differ


def test_test_transform_is_deterministic_center_crop() -> None:
    image = _random_image("RGB", (40, 40))
    transform = downstream_test_transform(32)  # resize to int(32 / 0.875) = 36, centre crop 32
    assert _only(transform, T.Resize).size == 36
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(1)
    assert torch.equal(a, transform(image))


def test_transforms_are_picklable() -> None:
    image = _random_image("L")
    for transform in (pretext_transform(16, 0.5), downstream_train_transform(16, 0.5), downstream_test_transform(16)):
        clone = pickle.loads(pickle.dumps(transform))
        torch.manual_seed(3)
        expected = transform(image)
        torch.manual_seed(3)
        got = clone(image)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize(("img_size", "scale"), [(0, 0.5), (32, 0.0), (32, 1.5), (32.0, 0.5)])
def test_bad_arguments_raise(img_size, scale) -> None:
    with pytest.raises(ValueError):
        pretext_transform(img_size, scale)
    with pytest.raises(ValueError):
        downstream_train_transform(img_size, scale)


def test_non_image_input_is_rejected() -> None:
    with pytest.raises(TypeError, match="PIL"):
        downstream_test_transform(8)(torch.zeros(3, 8, 8))


# ------------------------------------------------------------------ the fused downstream view


def _torchvision_downstream(img: Image.Image, box: tuple[int, int, int, int], flip: bool, img_size: int,
                            interpolation: T.InterpolationMode) -> np.ndarray:
    """The reference: what RandomResizedCrop and RandomHorizontalFlip call, with the given choices."""
    img = F.resized_crop(img, *box, [img_size, img_size], interpolation, antialias=True)
    return np.asarray(F.hflip(img) if flip else img)


@pytest.mark.parametrize("crop_as_original", [False, True])
def test_downstream_view_pixels_equal_torchvision_ops_for_the_same_choices(crop_as_original: bool) -> None:
    """Bit for bit over 400 random images and draws, on PIL images and on their uint8 arrays, with
    the chain's crop ranges and interpolation; the tensor equals ToTensor + Normalize of them."""
    rng = np.random.default_rng(2)
    view = downstream_train_view(24, 0.3, crop_as_original)
    chain_crop = _only(downstream_train_transform(24, 0.3, crop_as_original), T.RandomResizedCrop)
    assert view.scale == pytest.approx(chain_crop.scale) and view.ratio == pytest.approx(chain_crop.ratio)
    assert view.interpolation.name == chain_crop.interpolation.name.upper()
    torch.manual_seed(0)
    flips = 0
    for _ in range(400):
        size = (int(rng.integers(8, 64)), int(rng.integers(8, 64)))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        params = view.draw(*image.size)
        expected = _torchvision_downstream(image, params.box, params.flip, 24, chain_crop.interpolation)
        assert np.array_equal(view.apply(image, params), expected), params
        assert np.array_equal(view.apply_array(pixels, params), expected), params
        assert np.array_equal(view.apply_array(pixels, params, source_size=size), expected), params
        flips += params.flip
    assert 150 < flips < 250
    reference_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    image = _random_image("L", (40, 30))
    torch.manual_seed(5)
    out = view(image)
    torch.manual_seed(5)
    params = view.draw(40, 30)
    expected = reference_tensor(Image.fromarray(_torchvision_downstream(image.convert("RGB"), params.box, params.flip, 24,
                                                                        chain_crop.interpolation)))
    assert out.shape == (3, 24, 24) and torch.allclose(out, expected, atol=1e-5)
    torch.manual_seed(5)
    assert torch.equal(view.from_array(np.asarray(image.convert("RGB"))), out)


@pytest.mark.parametrize(("size", "crop_min_scale", "crop_as_original"), [
    ((28, 28), 0.08, False), ((56, 40), 0.5, False), ((40, 56), 0.5, True), ((90, 12), 0.3, False)])
def test_downstream_view_choices_follow_torchvision_distribution(size, crop_min_scale, crop_as_original) -> None:
    """The boxes against RandomResizedCrop.get_params with the chain's ranges (two-sample KS per
    coordinate and on the area, p > 1e-4), the flip at p 0.5 (4.5 standard deviations)."""
    n = 4000
    view = downstream_train_view(16, crop_min_scale, crop_as_original)
    crop = _only(downstream_train_transform(16, crop_min_scale, crop_as_original), T.RandomResizedCrop)
    torch.manual_seed(0)
    draws = [view.draw(*size) for _ in range(n)]
    ours = np.array([d.box for d in draws])
    image = Image.new("RGB", size)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(crop.scale), list(crop.ratio)) for _ in range(n)])
    for column in range(4):
        assert stats.ks_2samp(ours[:, column], theirs[:, column]).pvalue > 1e-4, column
    assert stats.ks_2samp(ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3]).pvalue > 1e-4
    assert abs(sum(d.flip for d in draws) - n / 2) <= 4.5 * np.sqrt(n / 4)


def test_downstream_view_draws_once_and_repeats_from_a_seed() -> None:
    """One torch draw of DOWNSTREAM_UNIFORMS per sample: the generator advances by exactly that."""
    view = downstream_train_view(16, 0.5)
    image = _random_image("RGB", (40, 30))
    torch.manual_seed(9)
    first = view(image)
    after = torch.rand(1)
    torch.manual_seed(9)
    torch.rand(DOWNSTREAM_UNIFORMS, dtype=torch.float64)
    assert torch.equal(torch.rand(1), after)
    torch.manual_seed(9)
    assert torch.equal(view(image), first)
    clone = pickle.loads(pickle.dumps(view))
    torch.manual_seed(9)
    assert torch.equal(clone(image), first)


def test_downstream_view_on_a_reduced_copy_crops_the_same_region() -> None:
    """A copy reduced 4x: the crop is drawn on the original size and resampled from the copy's
    fractional box, so the view stays within a grey level or two of the original's."""
    pixels = np.kron(_smooth_image(), np.ones((4, 4, 1), dtype=np.uint8))  # 160 x 192, smooth at the copy's scale
    original = Image.fromarray(pixels)
    copy = np.asarray(original.resize((48, 40), Image.Resampling.LANCZOS))
    view = DownstreamView(16, (0.5, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(0)
    errors = []
    for _ in range(100):
        params = view.draw(192, 160)
        errors.append(np.abs(view.apply(original, params).astype(int) - view.apply_array(copy, params, (192, 160)).astype(int)).mean())
    assert np.mean(errors) < 2.0 and max(errors) < 6.0, (np.mean(errors), max(errors))
    with pytest.raises(ValueError, match="flip_p"):
        DownstreamView(16, (0.5, 1.0), (3 / 4, 4 / 3), flip_p=1.5)
