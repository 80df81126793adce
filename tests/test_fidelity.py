"""Where this project follows or deliberately leaves the original code (docs/differences.md):
the head warmup's BatchNorm mode, and the switches that restore the
original's crop, initialisation, multi-label loss and upper-step count."""
import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from source.data.transforms import downstream_train_transform, pretext_transform
from source.maths.losses import downstream_criterion
from source.maths.models import build_backbone
from source.run.tracking import MetricsWriter
from source.stages.bissl_run import upper_steps_per_alternation
from source.stages.bissl_trainer import BisslTrainer
from tests.bissl_helpers import CLASSES, make_trainer
from tests.script_helpers import load_script

BATCH = 8


# ---------------------------------------------------------------------------------------------
# Head warmup: train-mode features, backbone state untouched
# ---------------------------------------------------------------------------------------------

def warmup_trainer() -> BisslTrainer:
    trainer = make_trainer("simclr", batch_norm=True)
    bn = trainer.upper_backbone[2]
    assert isinstance(bn, nn.BatchNorm1d)
    # Running statistics far from any batch's, as for weights whose statistics belong to other
    # inputs: eval-mode features then differ clearly from train-mode ones.
    with torch.no_grad():
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(0.05)
        bn.num_batches_tracked.fill_(7)
    return trainer


def downstream_batches(count: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 4, 4, generator=generator), torch.randint(0, CLASSES, (BATCH,), generator=generator))
            for _ in range(count)]


def test_head_warmup_learns_on_train_mode_features(tmp_path):
    trainer = warmup_trainer()
    backbone_before, head_before = copy.deepcopy(trainer.upper_backbone), copy.deepcopy(trainer.head)
    seen = []
    trainer.upper_backbone.register_forward_hook(lambda module, inputs, output: seen.append(output.detach().clone()))
    lr = 0.5
    batches = downstream_batches(1)
    trainer.warmup_head(iter(batches), 1, torch.optim.SGD(trainer.head.parameters(), lr=lr),
                        MetricsWriter(tmp_path, False, {}), show_progress=False)

    images, targets = batches[0]
    with torch.no_grad():
        train_features = copy.deepcopy(backbone_before).train()(images)
        eval_features = copy.deepcopy(backbone_before).eval()(images)
    assert not torch.allclose(train_features, eval_features, atol=1e-2)  # the two modes are distinguishable here
    assert len(seen) == 1 and torch.equal(seen[0], train_features)
    # The head's step is the one of CE on the train-mode features.
    reference = copy.deepcopy(head_before)
    F.cross_entropy(reference(train_features), targets).backward()
    with torch.no_grad():
        for param in reference.parameters():
            param -= lr * param.grad
    for got, want in zip(trainer.head.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)


def test_head_warmup_leaves_the_whole_backbone_state_dict_bit_identical(tmp_path):
    trainer = warmup_trainer()
    before = {key: value.clone() for key, value in trainer.upper_backbone.state_dict().items()}
    head_before = trainer.head.weight.detach().clone()
    trainer.warmup_head(iter(downstream_batches(3)), 3, torch.optim.SGD(trainer.head.parameters(), lr=0.5, momentum=0.9),
                        MetricsWriter(tmp_path, False, {}), show_progress=False)
    after = trainer.upper_backbone.state_dict()
    assert before.keys() == after.keys() and "2.num_batches_tracked" in after
    for key in before:  # weights, running mean/var and the batch counter
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(head_before, trainer.head.weight)
    assert trainer.upper_backbone.training  # the upper steps that follow run in train mode


def test_head_warmup_as_original_updates_only_the_bn_running_statistics(tmp_path):
    trainer = warmup_trainer()
    before = {key: value.clone() for key, value in trainer.upper_backbone.state_dict().items()}
    batches = downstream_batches(3)
    trainer.warmup_head(iter(batches), 3, torch.optim.SGD(trainer.head.parameters(), lr=0.5),
                        MetricsWriter(tmp_path, False, {}), show_progress=False, update_bn_statistics=True)
    after = trainer.upper_backbone.state_dict()
    expected_mean = before["2.running_mean"].clone()
    with torch.no_grad():  # three train-mode passes with BN momentum 0.1, as the original's warmup
        for images, _ in batches:
            hidden = before["1.weight"] @ images.flatten(1).T + before["1.bias"][:, None]
            expected_mean = 0.9 * expected_mean + 0.1 * hidden.mean(dim=1)
    torch.testing.assert_close(after["2.running_mean"], expected_mean)
    assert int(after["2.num_batches_tracked"]) == int(before["2.num_batches_tracked"]) + 3
    for key in ("1.weight", "1.bias", "2.weight", "2.bias"):  # parameters untouched
        assert torch.equal(before[key], after[key]), key


# ---------------------------------------------------------------------------------------------
# --crop-as-original
# ---------------------------------------------------------------------------------------------

def original_crop(img_size: int, min_ratio: float) -> T.RandomResizedCrop:
    """The crop as the original code wrote it (pretext and downstream pipelines alike)."""
    return T.RandomResizedCrop(size=img_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True, ratio=(min_ratio, 1.0))


def crops_of(pipeline: T.Compose) -> list[T.RandomResizedCrop]:
    return [step for step in pipeline.transforms if isinstance(step, T.RandomResizedCrop)]


def same_crop(a: T.RandomResizedCrop, b: T.RandomResizedCrop) -> bool:
    return (a.size, a.scale, a.ratio, a.interpolation, a.antialias) == (b.size, b.scale, b.ratio, b.interpolation, b.antialias)


def photo() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (40, 56, 3), generator=generator, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("min_ratio", [0.5, 0.2])
def test_crop_as_original_builds_the_original_crop_in_every_pipeline(min_ratio):
    want = original_crop(32, min_ratio)
    (crop,) = crops_of(downstream_train_transform(32, min_ratio, crop_as_original=True))
    assert same_crop(crop, want), crop
    assert crop.scale == (0.08, 1.0) and crop.ratio == (min_ratio, 1.0)
    img = photo()
    torch.manual_seed(3)
    got = crop(img)
    torch.manual_seed(3)
    assert got.tobytes() == want(img).tobytes()
    # The pretext views crop in their own fused code (bicubic, as the original; its sampling and
    # pixels are tested against RandomResizedCrop in test_transforms.py): the same ranges.
    pretext = pretext_transform(32, min_ratio, crop_as_original=True)
    for view in (pretext.view1, pretext.view2):
        assert (view.img_size, view.scale, view.ratio) == (32, (0.08, 1.0), (min_ratio, 1.0))


def test_default_crop_uses_the_minimum_as_area_scale():
    (crop,) = crops_of(downstream_train_transform(32, 0.5))
    assert crop.scale == (0.5, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    pretext = pretext_transform(32, 0.5)
    for view in (pretext.view1, pretext.view2):
        assert view.scale == (0.5, 1.0) and view.ratio == pytest.approx((3 / 4, 4 / 3))


# ---------------------------------------------------------------------------------------------
# --zero-init-residual
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_the_last_bn_gamma_of_every_block(arch, last_bn):
    torch.manual_seed(0)
    backbone, _ = build_backbone(arch, zero_init_residual=True)
    blocks = [block for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for block in layer]
    assert len(blocks) == (8 if arch == "resnet18" else 16)
    zeroed = {id(getattr(block, last_bn).weight) for block in blocks}
    for name, module in backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            expected = 0.0 if id(module.weight) in zeroed else 1.0
            assert torch.all(module.weight == expected), name
            assert torch.all(module.bias == 0), name
    plain, _ = build_backbone(arch)
    assert all(torch.all(getattr(block, last_bn).weight == 1) for layer in (plain.layer1, plain.layer4) for block in layer)


def test_pretraining_defaults_to_zero_init_residual():
    args = load_script("ssl_pre-training.py").get_args_parser().parse_args([])
    assert args.zero_init_residual == 1 and args.crop_as_original == 0


# ---------------------------------------------------------------------------------------------
# --multilabel-loss
# ---------------------------------------------------------------------------------------------

def test_multilabel_losses_match_their_formulas():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=generator)
    multi_hot = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.float32)
    log_p = logits.log_softmax(dim=1)
    original = -(multi_hot * log_p).sum(dim=1).mean()  # the original: softmax CE with the multi-hot as target
    torch.testing.assert_close(downstream_criterion(True, "ce")(logits, multi_hot), original)
    sigmoid = torch.sigmoid(logits)
    bce = -(multi_hot * sigmoid.log() + (1 - multi_hot) * (1 - sigmoid).log()).mean()
    torch.testing.assert_close(downstream_criterion(True, "bce")(logits, multi_hot), bce)
    labels = torch.tensor([0, 3, 1, 2, 2])
    for choice in ("bce", "ce"):  # single-label data always use cross-entropy
        torch.testing.assert_close(downstream_criterion(False, choice)(logits, labels), -log_p[torch.arange(5), labels].mean())
    with pytest.raises(ValueError, match="'mse'"):
        downstream_criterion(True, "mse")


@pytest.mark.parametrize("script", ["bissl.py", "fine-tuning.py"])
def test_multilabel_loss_flag(script):
    parser = load_script(script).get_args_parser()
    assert parser.parse_args([]).multilabel_loss == "bce"
    assert parser.parse_args(["--multilabel-loss", "ce"]).multilabel_loss == "ce"
    with pytest.raises(SystemExit):
        parser.parse_args(["--multilabel-loss", "mse"])


def test_fine_tune_uses_the_chosen_multilabel_loss(monkeypatch):
    import source.stages.finetune as finetune

    chosen = []

    def spy(multilabel, multilabel_loss="bce"):
        chosen.append((multilabel, multilabel_loss))
        return downstream_criterion(multilabel, multilabel_loss)

    monkeypatch.setattr(finetune, "downstream_criterion", spy)
    data = torch.utils.data.TensorDataset(torch.randn(8, 5), (torch.rand(8, 3) > 0.5).float())
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    finetune.fine_tune(nn.Linear(5, 3), loader, loader, loader, lr=0.1, wd=0.0, momentum=0.9, epochs=1,
                       device=torch.device("cpu"), amp_dtype=None, multilabel=True, multilabel_loss="ce")
    assert chosen == [(True, "ce")]


# ---------------------------------------------------------------------------------------------
# Upper steps per alternation (--upper-steps-whole-passes)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_iter, batches, whole_passes, expected", [
    (8, 3, True, 6),     # floor(8 / 3) = 2 passes of 3 batches
    (8, 5, True, 5),     # one pass
    (8, 4, True, 8),     # Flowers at batch 256 on 4 GPUs in the original: 2 passes of 4
    (8, 8, True, 8),     # DTD: one pass of 8
    (8, 12, True, 8),    # more batches than steps: unchanged
    (8, 3, False, 8),    # default: always N_U
    (8, 5, False, 8),
])
def test_upper_steps_per_alternation(num_iter, batches, whole_passes, expected):
    assert upper_steps_per_alternation(num_iter, batches, whole_passes) == expected


@pytest.mark.parametrize("script, flags", [
    ("ssl_pre-training.py", ["--crop-as-original", "--zero-init-residual"]),
    ("bissl.py", ["--crop-as-original", "--multilabel-loss", "--upper-steps-whole-passes", "--d-linear-warmup-update-bn"]),
    ("fine-tuning.py", ["--crop-as-original", "--multilabel-loss"]),
])
def test_help_lists_the_switches_with_what_the_original_did(script, flags):
    parser = load_script(script).get_args_parser()
    help_by_flag = {action.option_strings[0]: action.help for action in parser._actions if action.option_strings}
    for flag in flags:
        assert flag in parser.format_help()
        assert "original" in help_by_flag[flag], flag


def test_fine_tuning_help_shows_wd_default_0_001():
    parser = load_script("fine-tuning.py").get_args_parser()
    (wd,) = [action for action in parser._actions if "--wd" in action.option_strings]
    assert wd.default == 0.001 and "(default: 0.001)" in wd.help
