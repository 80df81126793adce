"""Parsers are generated from config_default and accept the SPEC's flags."""
import dataclasses

import pytest

import config_default as cfg
from source.run.cli import number_list
from source.run.errors import ConfigError
from tests.script_helpers import ROOT, load_script

SPEC_FLAGS = {
    "ssl_pre-training.py": "--data-dir --model-dir --download-dataset --device --num-workers --world-size --dist-url --omp-num-threads --pretext-type --img-size --img-crop-min-ratio --arch --mlp --epochs --dset --batch-size --lr --wd --momentum --optimizer --temperature --ma-decay --ma-use-scheduler --save-model",
    "bissl.py": "--data-dir --model-dir --arch --img-size --img-crop-min-ratio --epochs --d-dset --d-batch-size --d-lr --d-wd --d-momentum --d-optimizer --d-linear-warmup-epochs --p-dset --p-batch-size --p-pretext-type --p-mlp --p-temperature --p-ma-decay --p-ma-use-scheduler --p-lr --p-wd --p-momentum --p-optimizer --p-pretrained-backbone-filename --p-pretrained-proj-filename --p-pretrained-pred-filename --lower-num-iter --upper-num-iter --lam --cg-lam-dampening --cg-iter-num --cg-verbose --save-model",
    "fine-tuning.py": "--data-dir --model-dir --backbone-origin --pretrain-arch --pretrain-img-size --pretrain-img-crop-min-ratio --pretrained-backbone-filename --use-hpo --hpo-lr-min --hpo-lr-max --hpo-wd-min --hpo-wd-max --num-runs --batch-size --epochs --lr --wd --optimizer-momentum --dset --save-model",
}


@pytest.mark.parametrize("script", sorted(SPEC_FLAGS))
def test_spec_flags_accepted_with_defaults_in_help(script):
    if not (ROOT / script).exists():
        pytest.skip(f"{script} not present yet")
    parser = load_script(script).get_args_parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    missing = set(SPEC_FLAGS[script].split()) - options
    assert not missing, f"{script} lacks {sorted(missing)}"
    help_text = parser.format_help()
    assert "(default: " in help_text
    assert all(action.help for action in parser._actions if action.option_strings)


def test_defaults_match_the_paper():
    p, b, f = cfg.PretrainConfig(), cfg.BisslConfig(), cfg.FinetuneConfig()
    assert (p.epochs, p.batch_size, p.lr, p.wd, p.momentum, p.img_size, p.img_crop_min_ratio) == (500, 1024, 4.8, 1e-6, 0.9, 96, 0.5)
    assert (p.mlp, p.temperature, p.ma_decay, p.warmup_epochs) == ("256-256-256", 0.5, 0.9995, 10)
    assert (b.epochs, b.lower_num_iter, b.upper_num_iter, b.lam, b.cg_lam_dampening, b.cg_iter_num) == (500, 20, 8, 0.001, 10.0, 5)
    assert (b.p_lr, b.d_momentum, b.d_batch_size, b.d_linear_warmup_epochs, b.grad_clip) == (1.0, 0.9, 256, 20, 10.0)
    assert (f.epochs, f.batch_size, f.hpo_lr_min, f.hpo_lr_max, f.hpo_wd_min, f.hpo_wd_max, f.num_runs) == (400, 256, 1e-4, 1.0, 1e-5, 1e-2, 100)
    assert cfg.UPPER_LR_WD["simclr"]["pets"] == (0.03, 1e-3) and cfg.UPPER_LR_WD["byol"]["voc2007"] == (0.005, 6e-3)
    assert (f.lr, f.wd) == (0.05, 0.001)  # the original's fixed-seed (--use-hpo 0) defaults


def test_switches_default_to_this_project_and_zero_init_to_the_original():
    p, b, f = cfg.PretrainConfig(), cfg.BisslConfig(), cfg.FinetuneConfig()
    assert (p.crop_as_original, b.crop_as_original, f.crop_as_original) == (0, 0, 0)
    assert (b.multilabel_loss, f.multilabel_loss) == ("bce", "bce")
    assert (b.upper_steps_whole_passes, b.d_linear_warmup_update_bn, p.zero_init_residual) == (0, 0, 1)


def test_every_field_has_help():
    for config_cls in (cfg.GeneralConfig, cfg.PretrainConfig, cfg.BisslConfig, cfg.FinetuneConfig):
        for item in dataclasses.fields(config_cls):
            assert item.metadata.get("help"), f"{config_cls.__name__}.{item.name} has no help"


def test_readme_states_the_configured_defaults():
    readme = (ROOT / "README.md").read_text()
    p, b, f = cfg.PretrainConfig(), cfg.BisslConfig(), cfg.FinetuneConfig()
    def sci(x: float) -> str:  # 1e-06 -> 1e-6, as the README writes small numbers
        return f"{x:.0e}".replace("e-0", "e-")

    statements = {
        f"pre-training {p.epochs} epochs, batch {p.batch_size}": True,
        f"LARS (η {cfg.LARS_ETA:g}) lr {p.lr:g}, wd {sci(p.wd)}": True,
        f"{p.warmup_epochs} warmup epochs then cosine to {cfg.FINAL_LR_FACTOR:g}×": True,
        f"{p.img_size} px, crop scale min {p.img_crop_min_ratio:g}": True,
        f"projector\n`{p.mlp}`": True,
        f"SimCLR temperature {p.temperature:g}, BYOL EMA {p.ma_decay:g}": True,
        f"{b.epochs} alternations (`--epochs`) of\n{b.lower_num_iter} lower": True,
        f"and {b.upper_num_iter} upper (`--upper-num-iter`) steps, λ = {b.lam:g}, δ = {b.cg_lam_dampening:g}, {b.cg_iter_num} CG": True,
        f"lower LARS lr {b.p_lr:.1f}, upper SGD momentum {b.d_momentum:g} batch {b.d_batch_size}, head warmup {b.d_linear_warmup_epochs} epochs": True,
        f"clip gradients at norm {b.grad_clip:g}": True,
        f"Fine-tuning: {f.epochs}\nepochs, batch {f.batch_size}, SGD momentum {f.optimizer_momentum:g}": True,
        f"lr log-uniform in [{sci(f.hpo_lr_min)}, {f.hpo_lr_max:g}]": True,
        f"wd log-uniform in [{sci(f.hpo_wd_min)}, {sci(f.hpo_wd_max)}]": True,
        f"`--use-hpo 0` runs default to lr {f.lr:g}, wd {f.wd:g}": True,
    }
    flat = " ".join(readme.split())
    missing = [text for text in statements if " ".join(text.split()) not in flat]
    assert not missing, f"README does not state these defaults as configured: {missing}"


def test_number_list_parses_comma_separated_flags_and_names_the_flag_when_refusing():
    assert number_list("1e-5, 1e-4,,0", "--linear-wd") == [1e-5, 1e-4, 0.0]
    assert number_list("30,8", "--epochs", int, minimum=1) == [30, 8]
    for bad, kind, minimum in (("", float, 0), ("-1", float, 0), ("0", int, 1), ("1.5", int, 1), ("a,1", float, 0)):
        with pytest.raises(ConfigError, match="--flag"):
            number_list(bad, "--flag", kind, minimum)
