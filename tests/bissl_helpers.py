"""A tiny BiSSL trainer (linear backbone on 3x4x4 inputs) and its batches, shared by the trainer,
ablation and fidelity tests."""
import copy

import torch
from torch import nn

from source.maths.optim import build_optimizer, warmup_cosine_scheduler
from source.stages.bissl_trainer import BilevelSettings, BisslTrainer
from source.stages.pretext import BYOL, SimCLR

FEATURES, CLASSES = 6, 3


def tiny_backbone(batch_norm: bool) -> nn.Module:
    layers = [nn.Flatten(), nn.Linear(3 * 4 * 4, FEATURES)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(FEATURES))
    layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_trainer(kind: str, batch_norm: bool, seed: int = 0, gamma: float = 1.0) -> BisslTrainer:
    torch.manual_seed(seed)
    backbone = tiny_backbone(batch_norm)
    if kind == "simclr":
        lower = SimCLR(backbone, FEATURES, "8-5", temperature=0.5)
    else:
        lower = BYOL(backbone, FEATURES, "8-5")
        if not batch_norm:  # a BN-free BYOL: per-sample loss, so rank halves decompose exactly
            for module in (lower.projector, lower.predictor, lower.target_projector):
                for i, layer in enumerate(module):
                    if isinstance(layer, nn.BatchNorm1d):
                        module[i] = nn.Identity()
            lower.reset_target()
    upper = copy.deepcopy(lower.backbone)
    head = nn.Linear(FEATURES, CLASSES)
    settings = BilevelSettings(
        lam=0.5, cg_damping=1.0, cg_iters=3, cg_solver="layerwise", upper_plain_grad_scale=gamma, grad_clip=10.0,
        lower_steps_per_alternation=2, upper_steps_per_alternation=2, alternations=3, ma_decay=0.9,
        ma_use_scheduler=True,
    )
    lower_opt = build_optimizer("lars", list(lower.parameters()), 0.5, 1e-4, 0.9)
    upper_opt = build_optimizer("sgd", list(upper.parameters()) + list(head.parameters()), 0.1, 1e-4, 0.9)
    return BisslTrainer(
        lower, upper, head, nn.CrossEntropyLoss(), lower_opt, warmup_cosine_scheduler(lower_opt, 2, 6, 0.001),
        upper_opt, warmup_cosine_scheduler(upper_opt, 0, 6, 0.001), settings, torch.device("cpu"),
    )


def make_batches(seed: int, batch: int, alternations: int = 3):
    """Global batches: per alternation 2 lower + 1 Hessian batch of two views, and 2 upper batches."""
    generator = torch.Generator().manual_seed(seed)
    lower = [((torch.randn(batch, 3, 4, 4, generator=generator), torch.randn(batch, 3, 4, 4, generator=generator)), None)
             for _ in range(3 * alternations)]
    upper = [(torch.randn(batch, 3, 4, 4, generator=generator), torch.randint(0, CLASSES, (batch,), generator=generator))
             for _ in range(2 * alternations)]
    return lower, upper


def run_alternations(trainer: BisslTrainer, lower, upper, alternations: int = 3):
    lower_iter, upper_iter = iter(lower), iter(upper)
    history = [trainer.alternation(lower_iter, upper_iter) for _ in range(alternations)]
    flat = torch.cat([p.detach().flatten() for p in
                      [*trainer.lower_model.parameters(), *trainer.upper_backbone.parameters(), *trainer.head.parameters()]])
    return flat, history
