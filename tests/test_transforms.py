"""Augmentations: shapes, normalisation, crop scale (not ratio), view asymmetry, seeding, pickling."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from source.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViewTransform,
    blur_kernel_size,
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
    assert _random_apply_p(pretext.view1, T.GaussianBlur) == 1.0
    assert _random_apply_p(pretext.view2, T.GaussianBlur) == 0.1
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
        blur = _only(view, T.GaussianBlur)
        assert blur.sigma == (0.1, 2.0) and blur.kernel_size == (9, 9)
        normalize = _only(view, T.Normalize)
        assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD


@pytest.mark.parametrize(("img_size", "kernel"), [(8, 3), (32, 3), (64, 7), (96, 9), (224, 23)])
def test_blur_kernel_is_odd_and_about_ten_percent(img_size: int, kernel: int) -> None:
    assert blur_kernel_size(img_size) == kernel


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
