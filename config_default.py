"""Every default of the three BiSSL scripts, written once.

Each stage has one dataclass; each field is a command-line flag (``d_lr`` -> ``--d-lr``) whose
``help`` says what it is and why it has this value. The argparse parsers of
``ssl_pre-training.py``, ``bissl.py`` and ``fine-tuning.py`` are generated from these classes by
``source.run.cli.build_parser``, so a default is never written twice.

The values are the paper's (BiSSL, arXiv 2410.02387): ResNet-50 pre-trained on ImageNet at
96x96 px with 4 GPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


def opt(default: Any, help: str, choices: tuple | None = None, *, at_least: float | None = None,
        above: float | None = None, at_most: float | None = None, below: float | None = None,
        split_over_ranks: bool | str = False, detection: Any = None) -> Any:
    """A dataclass field carrying its command-line help text, optional choices and, for numbers, the
    bounds a value must respect (checked at parse time; a number without bounds must be >= 0).
    ``split_over_ranks``: a GLOBAL batch size that must divide by the world size (also checked at parse time);
    ``"detection"``: one for detection datasets only.
    ``detection``: the default when the script's dataset is a detection one (``default`` is the
    classification one); the parser fills in the one for the task when the flag is not given."""
    bounds = {name: value for name, value in
              {"at_least": at_least, "above": above, "at_most": at_most, "below": below}.items() if value is not None}
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds,
                                            "split_over_ranks": split_over_ranks, "detection_default": detection})


@dataclass
class GeneralConfig:
    """Flags shared by all three scripts."""

    data_dir: str = opt("./data/", "Root folder of all datasets, each in its torchvision layout.")
    model_dir: str = opt("./models/", "Folder where weights are read from and written to.")
    download_dataset: int = opt(0, "1: let torchvision download a missing dataset (where it can); 0: never download.", (0, 1))
    device: str = opt("auto", "auto = CUDA when available, else CPU.", ("auto", "cuda", "cpu"))
    num_workers: int = opt(-1, "DataLoader worker processes per rank. 0 = load in the main process, where a background "
                           "thread prepares the next batches while the model computes; -1 = auto: 0 on CPU (the model "
                           "step already uses every core), on CUDA the cores per GPU process minus one, at most 16 "
                           "(docs/data-loading.md).", at_least=-1)
    prefetch_factor: int = opt(2, "Batches each worker process (or the --num-workers 0 thread) prepares ahead.", at_least=1)
    channels_last: str = opt("auto", "Memory format of the backbones and their inputs: 1 = channels_last (NHWC, faster "
                             "convolutions on GPUs), 0 = contiguous NCHW; auto = 1 on CUDA, 0 on CPU (no gain measured there).",
                             ("auto", "0", "1"))
    world_size: int = opt(-1, "Expected number of processes (-1 = any): torchrun/Slurm set the real one via the environment; "
                              "a run started with another number stops with an error.", at_least=-1)
    dist_url: str = opt("env://", "Rendezvous for torch.distributed (env:// under torchrun; tcp://host:port under Slurm).")
    omp_num_threads: int = opt(0, "Threads per process for CPU ops (0 = leave PyTorch's/torchrun's choice).")
    seed: int = opt(0, "Base seed; each rank uses seed + rank for random, numpy and torch.")
    max_train_samples: int = opt(0, "Cap the training set at this many samples (seeded choice; 0 = all). For smoke runs.")
    run_dir: str = opt("", "Run directory for checkpoints and metrics (default: <model-dir>/runs/<run name>).")
    resume: int = opt(1, "1: continue automatically from the run directory's checkpoint if it exists; 0: start over.", (0, 1))
    amp: str = opt("auto", "Mixed precision: auto = bf16 on CUDA, none on CPU.", ("auto", "none", "bf16", "fp16"))
    compile: int = opt(0, "1: torch.compile the model's forward (and so its backward) in place: ssl_pre-training.py the "
                       "pretext model, fine-tuning.py each trial's classifier, bissl.py the upper backbone only (the "
                       "lower model is differentiated twice for the Hessian-vector products, which torch.compile does "
                       "not support). Needs a C++ compiler on CPU, Triton on CUDA; the first steps pay the compilation. "
                       "Off by default: its effect is not measured yet (bench/bench_pretrain_throughput.py --compile-ratio).",
                       (0, 1))
    wandb_project: str = opt("", "Weights & Biases project to log to (empty = no wandb).")
    wandb_mode: str = opt("online", "wandb mode; 'offline' works without network.", ("online", "offline", "disabled"))
    log_every: int = opt(10, "Write a metrics line every this many optimizer steps.", at_least=1)


# Switches shared by several stages (default: this project's behaviour; 1/ce: the original code's).
CROP_AS_ORIGINAL_HELP = (
    "1: the original code's crop, RandomResizedCrop(ratio=(crop min, 1)): the minimum given as the ASPECT-RATIO range, "
    "area scale left at (0.08, 1), bicubic (the published weights and numbers were made with it); 0: area scale (min, 1)."
)
MULTILABEL_LOSS_HELP = (
    "Loss of multi-label datasets (voc2007): bce = binary cross-entropy with logits per class; "
    "ce = softmax cross-entropy on the multi-hot targets, as the original code."
)
UPPER_STEPS_WHOLE_PASSES_HELP = (
    "1: as the original (ICML) code: when the downstream train split has at most --upper-num-iter batches, each alternation runs "
    "floor(N_U / batches) whole passes over it instead of N_U steps; 0: always N_U steps (as the NeurIPS code; "
    "the two agree on the paper's datasets)."
)
WARMUP_UPDATE_BN_HELP = (
    "1: as the original, the head warmup's train-mode passes also update the frozen backbone's BN running statistics "
    "(used only by the eval-mode val scores of the upper model, not by training); 0: its state_dict stays bit-identical."
)

# The weighted kNN classifier of the probe (source.tools.probe) and of bissl.py's alignment metrics
# (--lower-knn-every): k = 20 neighbours, vote weights exp(cos / 0.07) (Wu et al. 2018; DINO, solo-learn).
KNN_K = 20
KNN_TEMPERATURE = 0.07

# Shared by pre-training and the BiSSL lower level.
LARS_ETA = 0.001  # LARS trust coefficient (You et al., 2017), as the paper.
FINAL_LR_FACTOR = 0.001  # cosine schedules end at 0.001x the peak LR (paper).
# A parameter tensor whose root-mean-square exceeds this has diverged even if the loss looks finite (BatchNorm
# makes a network blind to the scale of the weights before it; SGD at lr 1e6 reaches 5e4 in 6 steps); runs stop
# before saving it. Healthy ResNet weights are O(0.01)-O(1), and LARS growth over a long run stays far below.
MAX_TENSOR_RMS = 1e4
# The same for buffers (BN statistics). They follow the input scale (the published weights carry statistics of
# 0-255 inputs, up to ~1e6) and a high-lr fine-tuning trial can reach 1e7, while a diverged run reaches 1e20+.
MAX_BUFFER_RMS = 1e12


@dataclass
class PretrainConfig:
    """Conventional self-supervised pre-training (``ssl_pre-training.py``)."""

    pretext_type: str = opt("simclr", "Self-supervised method.", ("simclr", "byol"))
    img_size: int = opt(96, "Training image side in pixels (paper: 96 for ImageNet).", at_least=1)
    img_crop_min_ratio: float = opt(0.5, "Minimum area SCALE of the random resized crop (the original passed it as aspect ratio by mistake).",
                                    above=0, at_most=1)
    crop_as_original: int = opt(0, CROP_AS_ORIGINAL_HELP, (0, 1))
    arch: str = opt("resnet50", "Backbone architecture.", ("resnet18", "resnet50"))
    zero_init_residual: int = opt(1, "1: zero the last BN gamma of every residual block at initialisation, as the original's timm ResNets.", (0, 1))
    cifar_stem: int = opt(0, "1: 3x3 stride-1 first conv and no max-pool, for images <= 64 px. Changes conv1's shape.", (0, 1))
    mlp: str = opt("256-256-256", "Projector (and BYOL predictor) widths: Linear+BN+ReLU hidden layers, last Linear without bias.")
    epochs: int = opt(500, "Training epochs.", at_least=1)
    dset: str = opt("imagenet", "Pre-training dataset.", ("imagenet", "stl10", "fashionmnist", "imagefolder"))
    batch_size: int = opt(1024, "GLOBAL batch size (split evenly over the ranks).", at_least=1, split_over_ranks=True)
    lr: float = opt(4.8, "Peak learning rate (no batch-size scaling).", above=0)
    wd: float = opt(1e-6, "Weight decay.")
    momentum: float = opt(0.9, "Optimizer momentum.", at_least=0, below=1)
    optimizer: str = opt("lars", "Optimizer.", ("lars", "sgd"))
    lars_exclude_bias_bn: int = opt(0, "1: exclude biases and BN parameters from LARS weight decay and adaptation (0 = original: include).", (0, 1))
    warmup_epochs: int = opt(10, "Linear LR warmup epochs before the cosine decay.")
    temperature: float = opt(0.5, "SimCLR NT-Xent temperature.", above=0)
    ma_decay: float = opt(0.9995, "BYOL target EMA decay (the base value when the schedule is on).", at_least=0, at_most=1)
    ma_use_scheduler: int = opt(0, "1: BYOL cosine EMA schedule from --ma-decay to 1 over training.", (0, 1))
    save_model: int = opt(1, "1: write the backbone/projector(/predictor) weights at the end.", (0, 1))


@dataclass
class BisslConfig:
    """The bilevel stage (``bissl.py``). ``d_*`` = downstream (upper level), ``p_*`` = pretext (lower level)."""

    arch: str = opt("resnet50", "Backbone architecture (must match the pretext weights).", ("resnet18", "resnet50"))
    cifar_stem: int = opt(0, "1: CIFAR-style stem (must match how the pretext backbone was trained).", (0, 1))
    img_size: int = opt(96, "Image side in pixels for both levels.", at_least=1)
    img_crop_min_ratio: float = opt(0.5, "Minimum area scale of random resized crops (both levels).", above=0, at_most=1)
    crop_as_original: int = opt(0, CROP_AS_ORIGINAL_HELP, (0, 1))
    epochs: int = opt(500, "Number of alternations T (each: --lower-num-iter lower steps, then --upper-num-iter upper steps).", at_least=1)
    d_dset: str = opt("pets", "Downstream dataset (upper level).")
    d_batch_size: int = opt(256, "GLOBAL downstream batch size.", at_least=1, split_over_ranks=True, detection=16)
    d_lr: Optional[float] = opt(None, "Upper-level SGD lr (default: the paper's per-dataset value, see UPPER_LR_WD).", above=0)
    d_wd: Optional[float] = opt(None, "Upper-level weight decay (default: the paper's per-dataset value).")
    d_momentum: float = opt(0.9, "Upper-level SGD momentum.", at_least=0, below=1)
    d_optimizer: str = opt("sgd", "Upper-level optimizer.", ("sgd",))
    d_linear_warmup_epochs: int = opt(20, "Epochs of training the downstream head alone (backbone frozen) before the alternations "
                                      "(detection: the RPN and RoI heads).", detection=5)
    d_linear_warmup_update_bn: int = opt(0, WARMUP_UPDATE_BN_HELP, (0, 1))
    multilabel_loss: str = opt("bce", MULTILABEL_LOSS_HELP, ("bce", "ce"))
    max_eval_samples: int = opt(0, "Cap the downstream val set at this many samples (seeded, stratified; 0 = all). For smoke runs.")
    d_max_train_samples: int = opt(0, "Cap the downstream training set (stratified, seeded; 0 = --max-train-samples), e.g. K labels per class.")
    d_linear_warmup_lr: float = opt(0.0, "LR of the head warmup (0 = use the upper lr).")
    val_fraction: float = opt(0.2, "Share of each downstream class held out for validation when no split file/official val split exists.", above=0, below=1)
    p_dset: str = opt("imagenet", "Pretext dataset (lower level).")
    p_batch_size: int = opt(1024, "GLOBAL pretext batch size.", at_least=1, split_over_ranks=True)
    p_pretext_type: str = opt("simclr", "Pretext method of the loaded weights.", ("simclr", "byol"))
    p_mlp: str = opt("256-256-256", "Projector/predictor widths of the loaded pretext head.")
    p_temperature: float = opt(0.5, "SimCLR temperature.", above=0)
    p_ma_decay: float = opt(0.9995, "BYOL target EMA decay.", at_least=0, at_most=1)
    p_ma_use_scheduler: int = opt(0, "1: cosine EMA schedule over the lower steps.", (0, 1))
    p_lr: float = opt(1.0, "Peak lower-level LARS lr.", above=0)
    p_wd: float = opt(1e-6, "Lower-level weight decay (as pre-training).")
    p_momentum: float = opt(0.9, "Lower-level momentum (as pre-training).", at_least=0, below=1)
    p_optimizer: str = opt("lars", "Lower-level optimizer.", ("lars", "sgd"))
    p_lars_exclude_bias_bn: int = opt(0, "1: exclude biases/BN params from LARS decay and adaptation.", (0, 1))
    p_pretrained_backbone_filename: str = opt("pretext_simclr_arch-resnet50_bb.pth", "Pretext backbone weights in --model-dir.")
    p_pretrained_proj_filename: str = opt("pretext_simclr_arch-resnet50_proj.pth", "Pretext projector weights in --model-dir.")
    p_pretrained_pred_filename: str = opt("", "BYOL predictor weights in --model-dir (default: pretext_byol_arch-<arch>_pred.pth).")
    lower_num_iter: int = opt(20, "Lower-level steps N_L per alternation.", at_least=1)
    upper_num_iter: int = opt(8, "Upper-level steps N_U per alternation.", at_least=1)
    upper_steps_whole_passes: int = opt(0, UPPER_STEPS_WHOLE_PASSES_HELP, (0, 1))
    lam: float = opt(0.001, "Proximity weight lambda of (lam/2)||theta_lower - theta_upper||^2.")
    cg_lam_dampening: float = opt(10.0, "CG dampening delta: solve (I + H/(lam + delta)) x = v.", at_least=-math.inf)
    cg_iter_num: int = opt(5, "Conjugate-gradient iterations per upper step.")
    cg_solver: str = opt("layerwise", "Solver of (I + H/(lam + delta)) x = v, one HVP per iteration: layerwise = CG with one "
                         "alpha/beta per tensor (the original); global = textbook CG; minres = MINRES (monotone "
                         "residual, also for indefinite systems). See docs/implicit-gradient.md.",
                         ("layerwise", "global", "minres"))
    hvp_precision: str = opt("fp32", "Precision of the Hessian-vector products and of the solve: fp32 = float32 as PyTorch's "
                             "defaults run it (the behaviour before this flag; on CUDA cuDNN may then run convolutions in "
                             "TF32, matmuls stay IEEE); fp32-strict = IEEE float32, TF32 off for matmuls and convolutions; "
                             "tf32 = TF32 matmuls and convolutions on CUDA; bf16 = the HVP's forward and double backward "
                             "under bf16 autocast, the solver's vectors and recurrences in float32; fp64 = a float64 copy "
                             "of the lower model and a float64 solve (slow; a reference). On CPU fp32, fp32-strict and tf32 "
                             "are the same. Default fp32 until a GPU measurement of accuracy and speed "
                             "(bench/bench_solvers.py --precisions, bench/cuda_run.sh) says otherwise.",
                             ("fp32", "fp32-strict", "tf32", "bf16", "fp64"))
    cg_verbose: int = opt(0, "1: log the solver's residual norms of every upper step.", (0, 1))
    curvature_every: int = opt(0, "Every N alternations, probe the pretext Hessian H with Lanczos (source/tools/curvature.py) and log "
                               "its extreme Ritz values and the smallest lam + delta making I + H/(lam + delta) positive "
                               "definite (0 = never; costs --curvature-iters HVPs).")
    curvature_iters: int = opt(30, "Lanczos iterations (HVPs) of each curvature probe.")
    lower_knn_every: int = opt(0, "Every N alternations and after the last, log align/lower_knn_top1 and align/upper_knn_top1: "
                               f"kNN top-1 (the rule of source.tools.probe: k = {KNN_K}, T = {KNN_TEMPERATURE}) of the lower "
                               "(theta_P) and upper (theta_D) backbone's features, a fixed seeded query set of the val split "
                               "scored against a fixed seeded bank of the downstream train split, both with the "
                               "deterministic test transform; BatchNorm in eval mode (running statistics), nothing "
                               "changed. Also once after the head warmup. 0 = never. Costs 2 x (bank + query) "
                               "forward passes each time (docs/evidence.md).")
    align_bank_size: int = opt(1000, "kNN bank of --lower-knn-every: this many of the downstream train images the upper level "
                               "uses (after --d-max-train-samples; stratified, seeded; all when fewer).", at_least=1)
    align_query_size: int = opt(1000, "kNN queries of --lower-knn-every: this many val images (stratified, seeded; the whole "
                                "val split when smaller).", at_least=1)
    eval_bn_recalibrate_batches: int = opt(0, "K > 0: evaluate theta_D + head on val after each alternation on a COPY whose "
                                           "BatchNorm running statistics are re-estimated (equal-weight average) over K "
                                           "fixed, seeded global batches of downstream train images with the test "
                                           "transform, so the val curve measures the weights rather than how far the "
                                           "running statistics lag them. Training is unchanged. 0 = the model's own statistics.")
    upper_plain_grad_scale: float = opt(1.0, "gamma: theta_upper's gradient is x + gamma * grad L_D(theta_upper, phi), the head's "
                                        "grad L_D(theta_lower, phi) + gamma * grad L_D(theta_upper, phi) (first paper version: 0.01).")
    grad_clip: float = opt(10.0, "Global gradient-norm clip of both levels (paper: 10).", above=0)
    lower_warmup_alternations: int = opt(10, "Lower LR warmup lasts this many alternations (10 * N_L steps, paper).")
    upper_level: int = opt(1, "0: ablation control: the same lower steps on the same pretext batches; no head warmup, upper steps, val (theta_D kept).", (0, 1))
    save_model: int = opt(1, "1: write the BiSSL backbones and head at the end.", (0, 1))


# Upper-level (lr, wd) per downstream dataset from the paper's released configs.
UPPER_LR_WD: dict[str, dict[str, tuple[float, float]]] = {
    "simclr": {
        "food": (0.03, 1e-3), "cars": (0.035, 1e-3), "dtd": (0.03, 1e-3), "pets": (0.03, 1e-3),
        "flowers": (0.05, 5e-4), "aircrafts": (0.03, 5e-3), "cifar10": (0.015, 1e-3),
        "cifar100": (0.01, 1e-4), "caltech101": (0.03, 1e-4), "sun397": (0.015, 5e-5),
        "voc2007": (0.015, 5e-3), "cub2011": (0.03, 1e-3),
        # Object detection (Faster R-CNN R-C4, the paper's VOC07+12 value; the generated set takes the same).
        "voc0712det": (0.015, 0.0), "fmnistdet": (0.015, 0.0),
    },
    "byol": {
        "food": (0.035, 2e-3), "cars": (0.04, 2e-3), "dtd": (0.015, 1e-4), "pets": (0.02, 2e-3),
        "flowers": (0.035, 2e-3), "aircrafts": (0.015, 3e-3), "cifar10": (0.01, 1e-3),
        "cifar100": (0.01, 1e-3), "caltech101": (0.015, 2e-4), "sun397": (0.01, 5e-5),
        "voc2007": (0.005, 6e-3), "cub2011": (0.015, 1e-4),
        "voc0712det": (0.03, 2e-4), "fmnistdet": (0.03, 2e-4),
    },
}
# Datasets outside the paper's table (fashionmnist, stl10, imagefolder) fall back to this pair.
UPPER_LR_WD_FALLBACK: tuple[float, float] = (0.03, 1e-3)


@dataclass
class FinetuneConfig:
    """Fine-tuning with random-grid HPO or repeated seeds (``fine-tuning.py``)."""

    backbone_origin: str = opt("pretext", "Where the backbone comes from; labels outputs.", ("pretext", "bissl"))
    pretrain_arch: str = opt("resnet50", "Architecture of the backbone file.", ("resnet18", "resnet50"))
    pretrain_cifar_stem: int = opt(0, "1: the backbone uses the CIFAR-style stem.", (0, 1))
    pretrain_img_size: int = opt(96, "Image side used for fine-tuning (that of pre-training).", at_least=1)
    pretrain_img_crop_min_ratio: float = opt(0.5, "Minimum area scale of the training random resized crop.", above=0, at_most=1)
    crop_as_original: int = opt(0, CROP_AS_ORIGINAL_HELP, (0, 1))
    pretrained_backbone_filename: str = opt("pretext_simclr_arch-resnet50_bb.pth", "Backbone weights in --model-dir.")
    use_hpo: int = opt(1, "1: random grid search over (lr, wd); 0: --num-runs seeds at fixed --lr/--wd.", (0, 1))
    # Detection defaults: the paper's detection fine-tuning (Faster R-CNN R50-C4 on VOC07+12, read from the authors'
    # NeurIPS-version code): 50 epochs, global batch 16 (detection images are large and few fit a GPU), 50 random
    # (lr, wd) pairs, lr log-uniform in [1e-4, 1e-1], wd in [1e-6, 1e-2] (quantised to the lower ends, as for classification).
    hpo_lr_min: float = opt(1e-4, "Lower end of the log-uniform lr range (also its quantisation step).", above=0, detection=1e-4)
    hpo_lr_max: float = opt(1.0, "Upper end of the lr range.", above=0, detection=1e-1)
    hpo_wd_min: float = opt(1e-5, "Lower end of the log-uniform wd range (also its quantisation step).", above=0, detection=1e-6)
    hpo_wd_max: float = opt(1e-2, "Upper end of the wd range.", above=0, detection=1e-2)
    num_runs: int = opt(100, "Number of trials (HPO combinations, or seeds with --use-hpo 0).", at_least=1, detection=50)
    batch_size: int = opt(256, "Batch size of each trial: one trial per process for classification; for detection the "
                          "GLOBAL batch of a trial that runs on all processes.", at_least=1, split_over_ranks="detection",
                          detection=16)
    epochs: int = opt(400, "Fine-tuning epochs per trial.", at_least=1, detection=50)
    lr: float = opt(0.05, "Fixed lr for --use-hpo 0 (set it to the best pair of the HPO).", above=0)
    wd: float = opt(0.001, "Fixed weight decay for --use-hpo 0 (the original's default).")
    multilabel_loss: str = opt("bce", MULTILABEL_LOSS_HELP, ("bce", "ce"))
    optimizer_momentum: float = opt(0.9, "SGD momentum.", at_least=0, below=1)
    dset: str = opt("pets", "Downstream dataset.")
    val_fraction: float = opt(0.2, "Share of each class held out for validation when no split file/official val split exists.", above=0, below=1)
    max_eval_samples: int = opt(0, "Cap the val and test sets at this many samples (seeded, stratified; 0 = all). For smoke runs.")
    save_model: int = opt(0, "1: write each trial's fine-tuned backbone and head.", (0, 1))
    decode_cache: str = opt("auto", "Decode every train/val/test image once per sweep into a memory-mapped uint8 cache shared "
                            "by all trials, ranks and workers, so each epoch only crops, flips and normalises "
                            "(docs/data-loading.md): on, off, or auto = on when the estimated size fits "
                            "--decode-cache-max-gb and the disk.", ("auto", "on", "off"))
    decode_cache_max_gb: float = opt(16.0, "Budget of --decode-cache auto, in GB, for a dataset's three splits together: "
                                     "the cache lives in the page cache, one copy per machine (Pets at 96 px: ~0.4 GB, "
                                     "Food-101: ~7 GB).", above=0)
    decode_cache_dir: str = opt("", "Folder of the decoded-image caches (default: <data-dir>/.decoded_cache); one "
                                "per dataset split and resize, reused by later sweeps.")
    decode_cache_side: int = opt(0, "Short side, in pixels, to which cached train images larger than it are reduced; "
                                 "0 = the smallest at which every random crop still has --pretrain-img-size stored pixels "
                                 "per axis (157 at 96 px and crop scale 0.5).")


@dataclass
class DetectionConfig:
    """Object detection (``--dset`` / ``--d-dset`` voc0712det or fmnistdet): Faster R-CNN R-C4 around the
    backbone (source/maths/detection_model.py). Defaults: the standard C4 design at the paper's image and
    anchor sizes; the flags reach the original code's (docs/detection.md)."""

    det_head: str = opt("res5", "Box head: res5 = the backbone's layer4 on each RoI, then average pooling (standard C4; "
                        "BiSSL couples the whole backbone); original = layer4 discarded, two 1024-wide FC layers "
                        "(the original code; BiSSL couples conv1..layer3, layer4 joins the pretext head).", ("res5", "original"))
    det_min_size: int = opt(196, "Short side, in pixels, images are resized to (the paper's 196; backbones pre-trained at 96 px).", at_least=1)
    det_max_size: int = opt(320, "Cap on the long side, in pixels, after resizing (the paper's 320).", at_least=1)
    det_anchor_sizes: str = opt("16,32,64,128,256", "Comma-separated RPN anchor sizes in pixels on the stride-16 map, "
                                "each with aspect ratios 0.5, 1, 2 (the paper's 16-256).")
    det_flip: float = opt(0.5, "Probability of flipping a training image horizontally (detectron2's VOC recipe: 0.5; "
                          "the original code: 0).", at_least=0, at_most=1)
    det_rois_per_image: int = opt(512, "RoIs sampled per training image for the box head (torchvision's and detectron2's 512; "
                                  "fewer make a CPU step cheaper).", at_least=1)
    det_test_proposals: int = opt(1000, "RPN proposals kept per image at evaluation (torchvision's 1000; each goes through "
                                  "the box head, layer4 with the res5 head).", at_least=1)
    det_frozen_bn: int = opt(0, "1: BatchNorm frozen (running statistics and affine terms fixed, detectron2's FrozenBN); "
                             "0: trained BN (SyncBN over several CUDA processes in fine-tuning, as the paper).", (0, 1))


@dataclass
class ProbeConfig:
    """Quick check of a frozen backbone (``python -m source.tools.probe``): kNN and linear probe on its features."""

    arch: str = opt("resnet50", "Architecture of the backbone file.", ("resnet18", "resnet50"))
    cifar_stem: int = opt(0, "1: the backbone uses the CIFAR-style stem.", (0, 1))
    img_size: int = opt(96, "Image side of the (deterministic, resize + centre crop) evaluation transform.", at_least=1)
    backbone_filename: str = opt("pretext_simclr_arch-resnet50_bb.pth", "Backbone weights in --model-dir (any format `source.tools.weights convert` reads).")
    dset: str = opt("pets", "Downstream dataset: features of its train split are the kNN bank / probe training set.")
    val_fraction: float = opt(0.2, "Share of each class held out for validation when no split file/official val split exists.", above=0, below=1)
    max_eval_samples: int = opt(0, "Cap the val and test sets at this many samples (seeded, stratified; 0 = all).")
    batch_size: int = opt(256, "Images per forward pass on each rank.", at_least=1)
    knn_k: int = opt(KNN_K, "Neighbours of the weighted kNN classifier (20, as Wu et al. 2018 / DINO).", at_least=1)
    knn_temperature: float = opt(KNN_TEMPERATURE, "Temperature T of the kNN vote weights exp(cos / T) (0.07, as the SSL literature).", above=0)
    linear_wd: str = opt("1e-6,1e-5,1e-4,1e-3,1e-2", "Comma-separated L2 penalties of the linear probe; the best on val is reported on test.")
    linear_max_iter: int = opt(300, "L-BFGS iterations of the full-batch linear probe.", at_least=1)
    recalibrate_bn: int = opt(0, "1: re-estimate BatchNorm running statistics on the train split first "
                                 "(needed when they belong to other inputs, e.g. the published weights).", (0, 1))
    cache_dir: str = opt("", "Feature cache (default: <model-dir>/probe_cache); keyed by the backbone's content hash and the data settings.")
