"""Augmentations: shapes, normalisation, crop scale (not ratio), view asymmetry, seeding, pickling;
the PIL blur against an exact Gaussian and the per-view blur/solarise probabilities."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import ndimage
from torchvision import transforms as T

from source.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GaussianBlur,
    ToNormalizedTensor,
    TwoViewTransform,
    downstream_test_transform,
    downstream_train_transform,
    pretext_transform,
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


def _random_apply_p(compose: T.Compose, kind: type) -> float:
    for step in compose.transforms:
        if isinstance(step, T.RandomApply) and any(isinstance(inner, kind) for inner in step.transforms):
            return step.p
    raise AssertionError(f"no RandomApply wrapping {kind.__name__}")


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
    for compose in (pretext.view1, pretext.view2, downstream_train_transform(32, crop_min_scale)):
        crop = _only(compose, T.RandomResizedCrop)
        assert crop.scale == (crop_min_scale, 1.0)
        assert crop.ratio == pytest.approx((3 / 4, 4 / 3))  # torchvision's default aspect range
        assert crop.size == (32, 32)


def test_view_asymmetry_and_shared_settings() -> None:
    pretext = pretext_transform(96, 0.5)
    assert isinstance(pretext, TwoViewTransform)
    assert _random_apply_p(pretext.view1, GaussianBlur) == 1.0
    assert _random_apply_p(pretext.view2, GaussianBlur) == 0.1
    assert not any(isinstance(step, T.RandomSolarize) for step in _steps(pretext.view1))
    solarize = _only(pretext.view2, T.RandomSolarize)
    assert solarize.p == 0.2 and solarize.threshold == 128
    for view in (pretext.view1, pretext.view2):
        assert _random_apply_p(view, T.ColorJitter) == 0.8
        jitter = _only(view, T.ColorJitter)
        assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
        assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == pytest.approx((-0.1, 0.1))
        assert _only(view, T.RandomGrayscale).p == 0.2
        assert _only(view, T.RandomHorizontalFlip).p == 0.5
        assert _only(view, GaussianBlur).sigma == (0.1, 2.0)
        assert not any(isinstance(step, T.GaussianBlur) for step in _steps(view))  # the slow tensor blur is gone
        normalize = _only(view, ToNormalizedTensor)
        assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD


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
    pixels = _smooth_image()
    blur = GaussianBlur((sigma, sigma))  # a one-point range: sigma is known
    out = np.asarray(blur(Image.fromarray(pixels)), dtype=np.float64)
    # PIL's three box filters match the exact Gaussian to a fraction of a grey level on average
    # (a few levels at the disc's sharp edge); a 30% wrong sigma is off by 2-5x more.
    assert np.abs(out - _exact_gaussian(pixels, sigma)).mean() < 0.5
    assert np.abs(out - _exact_gaussian(pixels, sigma)).max() < 8
    assert np.abs(out - _exact_gaussian(pixels, 1.3 * sigma)).mean() > 0.7


def test_blur_sigma_is_uniform_in_the_recipe_range(monkeypatch) -> None:
    radii: list[float] = []
    real_filter = ImageFilter.GaussianBlur

    def recording_filter(radius):
        radii.append(radius)
        return real_filter(radius)

    monkeypatch.setattr(ImageFilter, "GaussianBlur", recording_filter)
    blur, image = GaussianBlur(), Image.new("RGB", (4, 4))
    torch.manual_seed(0)
    for _ in range(2000):
        blur(image)
    radii_array = np.array(radii)
    assert radii_array.min() >= 0.1 and radii_array.max() <= 2.0
    # Uniform on [0.1, 2]: mean 1.05, and each fifth of the range holds 20% (+- 3% at n = 2000).
    assert abs(radii_array.mean() - 1.05) < 0.04
    counts = np.histogram(radii_array, bins=5, range=(0.1, 2.0))[0] / len(radii_array)
    assert np.all(np.abs(counts - 0.2) < 0.03)
    torch.manual_seed(0)
    expected_sigma = torch.empty(1).uniform_(0.1, 2.0).item()  # sigma comes from torch's generator
    assert radii[0] == expected_sigma


def test_blur_and_solarise_probabilities_per_view(monkeypatch) -> None:
    """Run whole views and count what was applied: view 1 blurs always, view 2 blurs 10% and
    solarises 20% of the time, view 1 never solarises (binomial bounds of 4.5 standard deviations)."""
    pretext = pretext_transform(8, 0.5)
    counts = {"blur": 0, "solarize": 0}
    real_blur, real_solarize = GaussianBlur.__call__, T.RandomSolarize.forward

    def counting_blur(self, img):
        counts["blur"] += 1
        return real_blur(self, img)

    def counting_solarize(self, img):
        before = np.asarray(img).copy()
        out = real_solarize(self, img)
        counts["solarize"] += not np.array_equal(before, np.asarray(out))
        return out

    monkeypatch.setattr(GaussianBlur, "__call__", counting_blur)
    monkeypatch.setattr(T.RandomSolarize, "forward", counting_solarize)
    image = Image.fromarray(_smooth_image()[:12, 18:30])
    torch.manual_seed(0)
    n = 1000
    expected = {"view1": (1.0, 0.0), "view2": (0.1, 0.2)}
    for name, view in (("view1", pretext.view1), ("view2", pretext.view2)):
        counts.update(blur=0, solarize=0)
        for _ in range(n):
            view(image)
        for kind, p in zip(("blur", "solarize"), expected[name]):
            bound = 4.5 * np.sqrt(n * p * (1 - p))
            assert abs(counts[kind] - n * p) <= bound, (name, kind, counts[kind])


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
