"""The BiSSL stage: head warmup, then alternating lower (pretext) and upper (downstream) steps.

Zakarias et al., "BiSSL: Enhancing the Alignment Between Self-Supervised Pretraining and
Downstream Fine-Tuning via Bilevel Optimization" (arXiv 2410.02387):

    lower:  min_{θ_P, ψ}  L_P(θ_P, ψ) + (λ/2)‖θ_P − θ_D‖²          (θ_D fixed)
    upper:  min_{θ_D, φ}  L_D(θ_P*(θ_D), φ)

Upper gradients (one upper step):
    θ_D:  x + γ·∇_θD L_D(θ_D, φ),   x ≈ (I + H/(λ + δ))⁻¹ ∇_θ L_D(θ_P, φ)  (Krylov solver on HVPs of L_P)
    φ:    ∇_φ L_D(θ_P, φ) + γ·∇_φ L_D(θ_D, φ)
(γ = ``upper_plain_grad_scale`` scales both plain downstream gradients, as the first paper
version's code did; γ = 1 by default.)

No DistributedDataParallel wrapper is used: every gradient (and, inside
``implicit_gradient``, the CG right-hand side and every HVP) is averaged over ranks explicitly,
so all ranks apply identical updates and the upper and lower parameters stay identical.
BatchNorm is per-rank (SyncBatchNorm has no double backward); its running statistics are
averaged over ranks after each alternation.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from source.data.stream import BatchStream
from source.maths.bilevel import (
    HessianVectorOperator,
    SolveReport,
    frozen_batch_norm_statistics,
    implicit_gradient,
    preserved_buffers,
)
from source.maths.coupling import proximity_gradient_ratio, relative_distance
from source.run.distributed import all_reduce_buffers_, all_reduce_gradients_, all_reduce_mean_, get_rank
from source.run.tracking import MetricsWriter
from source.stages.engine import check_finite
from source.stages.pretext import BYOL, byol_decay

logger = logging.getLogger(__name__)

# The phases of UpperTask's ``draw`` keys: head warmup, upper loss through θ_P, upper loss through θ_D.
WARMUP_DRAW, LOWER_DRAW, UPPER_DRAW = 0, 1, 2


@dataclass
class BilevelSettings:
    """The numbers of one BiSSL run (from the command line)."""

    lam: float
    cg_damping: float
    cg_iters: int
    cg_solver: str  # layerwise | global | minres (source.maths.bilevel.SOLVERS)
    upper_plain_grad_scale: float
    grad_clip: float
    lower_steps_per_alternation: int
    upper_steps_per_alternation: int
    alternations: int
    ma_decay: float
    ma_use_scheduler: bool
    cg_verbose: bool = False
    # Build the pretext forward pass and first-order graph for the HVPs once per alternation and
    # share it across its upper steps (θ_P and ψ do not change during them, so H does not);
    # False rebuilds it in every upper step (the same x up to rounding; for benchmarks).
    share_hessian_graph: bool = True
    # False: the ablation control (experiments/bissl_ablation.py): the lower level alone, with θ_D
    # frozen at its start, so BiSSL can be compared with as many extra pretext steps.
    upper_level: bool = True
    # Precision of the HVPs and of the solve (source.maths.bilevel.HVP_PRECISIONS; fp32: as before the flag).
    hvp_precision: str = "fp32"


@torch.no_grad()
def backbone_distance(lower: nn.Module | Sequence[torch.Tensor], upper: nn.Module | Sequence[torch.Tensor]) -> torch.Tensor:
    """‖θ_P − θ_D‖ over all backbone parameters, or over the given parameter lists (0-dim tensor)."""
    lower = lower.parameters() if isinstance(lower, nn.Module) else lower
    upper = upper.parameters() if isinstance(upper, nn.Module) else upper
    return torch.sqrt(sum(((p - u) ** 2).sum() for p, u in zip(lower, upper, strict=True)))


class UpperTask(Protocol):
    """An upper level that is not a classifier on the backbone's pooled features (object detection:
    :class:`source.stages.bissl_detection.DetectionUpperTask`). ``draw`` = (phase, step) names the
    forward pass, so a task whose model draws random numbers can seed them repeatably."""

    def shared_parameters(self, backbone: nn.Module) -> list[nn.Parameter]:
        """The parameters of ``backbone`` the task's model uses: the implicit gradient's unknowns."""

    def head_parameters(self) -> list[nn.Parameter]:
        """φ: the task's own trainable parameters."""

    def loss(self, backbone: nn.Module, images: Any, targets: Any, draw: tuple[int, int]) -> torch.Tensor:
        """L_D(backbone's weights, φ) on one batch (train mode)."""

    def warmup_loss(self, backbone: nn.Module, images: Any, targets: Any, update_bn_statistics: bool,
                    draw: tuple[int, int]) -> torch.Tensor:
        """L_D with ``backbone`` frozen (no gradient reaches it), for the head warmup."""


class BisslTrainer:
    """Holds both levels and performs warmup, lower and upper steps on streams of batches.

    lower_model: SimCLR/BYOL module with ``.backbone``; ``lower_model(v1, v2)`` -> pretext loss.
    upper_backbone, head: the downstream model θ_D, φ; ``criterion(logits, targets)`` -> loss.
    """

    def __init__(
        self, lower_model: nn.Module, upper_backbone: nn.Module, head: nn.Module,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        lower_optimizer: torch.optim.Optimizer, lower_scheduler: torch.optim.lr_scheduler.LRScheduler,
        upper_optimizer: torch.optim.Optimizer, upper_scheduler: torch.optim.lr_scheduler.LRScheduler,
        settings: BilevelSettings, device: torch.device, amp_dtype: torch.dtype | None = None,
        upper_task: UpperTask | None = None,
    ) -> None:
        self.lower_model, self.upper_backbone, self.head = lower_model, upper_backbone, head
        self.criterion = criterion
        self.lower_optimizer, self.lower_scheduler = lower_optimizer, lower_scheduler
        self.upper_optimizer, self.upper_scheduler = upper_optimizer, upper_scheduler
        self.settings, self.device, self.amp_dtype = settings, device, amp_dtype
        self.upper_task = upper_task
        self.lower_params = [p for p in lower_model.parameters() if p.requires_grad]
        if upper_task is None:
            self.lower_backbone_params = list(lower_model.backbone.parameters())
            self.upper_backbone_params = list(upper_backbone.parameters())
            self.head_params = list(head.parameters())
        else:  # only the part of the backbone the task's model uses is coupled (proximity, implicit gradient)
            self.lower_backbone_params = upper_task.shared_parameters(lower_model.backbone)
            self.upper_backbone_params = upper_task.shared_parameters(upper_backbone)
            self.head_params = upper_task.head_parameters()
        for lower, upper in zip(self.lower_backbone_params, self.upper_backbone_params, strict=True):
            assert lower.shape == upper.shape, "lower and upper backbones must share one architecture"
        self.lower_step_count = 0
        self.upper_step_count = 0
        self._warned_cg_growth = False

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def _to_device(self, batch: Any) -> Any:
        """A tensor, or the lists of images and target dicts of a detection batch, on the device."""
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(item) for item in batch)
        if isinstance(batch, dict):
            return {key: self._to_device(value) for key, value in batch.items()}
        return batch.to(self.device, non_blocking=True)

    def _upper_loss(self, backbone: nn.Module, images: Any, targets: Any, draw: tuple[int, int]) -> torch.Tensor:
        """L_D(backbone's weights, φ) on this rank's batch: the criterion on the head's logits, or the upper task's loss."""
        if self.upper_task is not None:
            return self.upper_task.loss(backbone, images, targets, draw)
        return self.criterion(self.head(backbone(images)).float(), targets)

    # ---------------------------------------------------------------------------------------
    def warmup_head(self, stream: BatchStream, steps: int, optimizer: torch.optim.Optimizer,
                    writer: MetricsWriter, show_progress: bool, update_bn_statistics: bool = False) -> None:
        """Train the head φ alone on frozen upper-backbone features.

        The backbone runs in TRAIN mode (BatchNorm normalises with the batch's statistics), as in
        every upper step that follows, so the head learns on the features it will be fed there;
        in eval mode it would learn on features normalised by running statistics, which for
        weights whose statistics belong to other inputs (the published backbones, pre-trained on
        inputs 255x larger) are nearly constant. No gradients reach the backbone, and its BN
        running statistics and counters are restored after each forward pass, so its whole
        ``state_dict`` stays bit-identical.

        ``update_bn_statistics`` (the original's behaviour) lets these passes update θ_D's BN
        running statistics instead (averaged over ranks at the end). Training is the same either
        way -- every later pass through θ_D runs in train mode -- but the statistics are what the
        eval-mode val evaluation of the upper model uses; left at the pretext ones, they make its
        scores understate the model until the upper steps have replaced them.
        """
        from tqdm import tqdm

        self.upper_backbone.train()
        self.head.train()
        for step in tqdm(range(steps), desc="head warmup", disable=not show_progress, leave=False):
            images, targets = next(stream)
            images, targets = self._to_device(images), self._to_device(targets)
            keep_buffers = contextlib.nullcontext() if update_bn_statistics else preserved_buffers(self.upper_backbone)
            if self.upper_task is not None:
                with self._autocast():
                    loss = self.upper_task.warmup_loss(self.upper_backbone, images, targets, update_bn_statistics,
                                                       draw=(WARMUP_DRAW, step))
            else:
                with torch.no_grad(), self._autocast(), keep_buffers:
                    features = self.upper_backbone(images)
                with self._autocast():
                    loss = self.criterion(self.head(features.float()), targets)
            loss_value = all_reduce_mean_(loss.detach().float().clone()).item()
            check_finite(loss_value, f"in the head warmup, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_gradients_(self.head_params)
            optimizer.step()
            if (step + 1) % 10 == 0 or step + 1 == steps:
                writer.log({"warmup/loss": loss_value}, step)
        if update_bn_statistics:
            all_reduce_buffers_(self.upper_backbone)  # per-rank batches: make every rank's statistics the same

    # ---------------------------------------------------------------------------------------
    def lower_step(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, float]:
        """One step of the lower optimizer (``--p-optimizer``: LARS by default) on L_P(θ_P, ψ) + (λ/2)‖θ_P − θ_D‖²
        (θ_D fixed), the gradient clipped to grad_clip.

        Also returns ``coupling/prox_grad_ratio`` = ‖λ(θ_P − θ_D)‖ / ‖∇_θP L_P‖ of this step's
        (rank-averaged, unclipped) gradient (``source.maths.coupling``)."""
        view1, view2 = self._to_device(view1), self._to_device(view2)
        self.lower_model.train()
        with self._autocast():
            pretext_loss = self.lower_model(view1, view2)
        proximity = 0.5 * self.settings.lam * sum(
            ((p - u.detach()) ** 2).sum() for p, u in zip(self.lower_backbone_params, self.upper_backbone_params)
        )
        loss = pretext_loss.float() + proximity
        loss_value = all_reduce_mean_(pretext_loss.detach().float().clone()).item()
        check_finite(loss_value, f"at lower step {self.lower_step_count}")
        self.lower_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients_(self.lower_params)
        # read before clipping changes the gradients (only read: the step is the same without it)
        prox_ratio = proximity_gradient_ratio(self.lower_backbone_params, self.upper_backbone_params, self.settings.lam)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lower_params, self.settings.grad_clip)
        check_finite(float(grad_norm), f"(gradient norm) at lower step {self.lower_step_count}")
        lr = self.lower_optimizer.param_groups[0]["lr"]
        self.lower_optimizer.step()
        self.lower_scheduler.step()
        self.lower_step_count += 1
        if isinstance(self.lower_model, BYOL):
            total = self.settings.alternations * self.settings.lower_steps_per_alternation
            self.lower_model.update_target(
                byol_decay(self.lower_step_count, total, self.settings.ma_decay, self.settings.ma_use_scheduler)
            )
        return {"lower/loss": loss_value, "lower/proximity": float(proximity.detach()), "lower/lr": lr,
                "lower/grad_norm": float(grad_norm), "coupling/prox_grad_ratio": float(prox_ratio)}

    # ---------------------------------------------------------------------------------------
    def hessian_operator(self, hessian_views: tuple[torch.Tensor, torch.Tensor]) -> HessianVectorOperator:
        """H·v on one pretext batch: its forward pass and first-order graph, built once.

        H = ∇²_θP L_P on this rank's batch (``implicit_gradient`` averages the products over ranks),
        in the precision ``settings.hvp_precision`` (not the run's ``--amp``: the double backward is
        sensitive to rounding, so lowering it is a separate, measured choice); ``fp64`` builds it on a
        float64 copy of the lower model. BatchNorm runs in train mode with batch statistics and its
        running statistics untouched (``frozen_batch_norm_statistics``), so the graph stays valid
        while other forward passes run. It holds the batch's activations until dropped.
        """
        view1, view2 = (self._to_device(v) for v in hessian_views)
        model, params = self.lower_model, self.lower_backbone_params
        if self.settings.hvp_precision == "fp64":
            model = copy.deepcopy(self.lower_model).double()
            params, view1, view2 = list(model.backbone.parameters()), view1.double(), view2.double()
        model.train()
        with frozen_batch_norm_statistics(model):
            return HessianVectorOperator(lambda: model(view1, view2, gather_across_ranks=False), params,
                                         self.settings.hvp_precision)

    def upper_step(self, images: torch.Tensor, targets: torch.Tensor,
                   hessian_views: tuple[torch.Tensor, torch.Tensor] | None,
                   hessian: HessianVectorOperator | None = None) -> dict[str, float]:
        """One SGD step of the upper level with the implicit gradient (see module docstring).

        hessian: the operator of ``hessian_operator(hessian_views)`` when the alternation shares
        one across its upper steps; without it the step builds its own from ``hessian_views``.
        """
        images, targets = self._to_device(images), self._to_device(targets)
        self.lower_model.train()
        self.upper_backbone.train()
        self.head.train()
        rhs, head_grad_via_lower, loss_through_lower = self._gradients_through_lower(images, targets)
        plain, upper_value = self._plain_gradients(images, targets)
        implicit, report = self._implicit_gradient(rhs, hessian_views, hessian)
        grad_norm = self._set_upper_gradients(plain, head_grad_via_lower, implicit)
        metrics = report.metrics("cg/")
        # A diverged solve shows up here; it is reported, never clipped away or zeroed.
        check_finite(float(grad_norm), f"(upper gradient norm incl. the implicit gradient; {report.solver} true "
                                       f"relative residual {metrics['cg/true_rel_residual']:.4g}, CG residuals "
                                       f"(recurrence) {[round(float(r), 4) for r in report.residual_norms]}) "
                                       f"at upper step {self.upper_step_count}")
        lr = self.upper_optimizer.param_groups[0]["lr"]
        self.upper_optimizer.step()
        self.upper_optimizer.zero_grad(set_to_none=True)
        self.upper_scheduler.step()
        self.upper_step_count += 1
        metrics.update({
            "upper/loss": upper_value,
            "upper/loss_through_lower": all_reduce_mean_(loss_through_lower.detach().float().clone()).item(),
            "upper/lr": lr, "upper/grad_norm": float(grad_norm),
            # ‖v − A·x‖ of the x applied (the solver's recurrence can differ from it: see SolveReport)
            "cg/residual_last": metrics["cg/true_rel_residual"] * metrics["cg/rhs_norm"],
        })
        self._report_solve(report, metrics["cg/true_rel_residual"])
        return metrics

    def _gradients_through_lower(self, images: torch.Tensor, targets: torch.Tensor
                                 ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:
        """v = ∇_θP L_D(θ_P, φ), ∇_φ L_D(θ_P, φ) and L_D(θ_P, φ) itself on this rank's batch.

        The downstream batch must not leak into the lower backbone's BN statistics (frozen, rather
        than restored afterwards: a restoring write would invalidate a shared Hessian graph, whose
        BN layers are these).
        """
        with frozen_batch_norm_statistics(self.lower_model.backbone), self._autocast():
            loss = self._upper_loss(self.lower_model.backbone, images, targets, draw=(LOWER_DRAW, self.upper_step_count))
        grads = torch.autograd.grad(loss, self.lower_backbone_params + self.head_params)
        num_backbone = len(self.lower_backbone_params)
        return grads[:num_backbone], grads[num_backbone:], loss

    def _plain_gradients(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], float]:
        """∇_(θD, φ) L_D(θ_D, φ) on this rank's batch, and L_D averaged over ranks (checked finite)."""
        with self._autocast():
            upper_loss = self._upper_loss(self.upper_backbone, images, targets, draw=(UPPER_DRAW, self.upper_step_count))
        upper_value = all_reduce_mean_(upper_loss.detach().float().clone()).item()
        check_finite(upper_value, f"at upper step {self.upper_step_count}")
        return torch.autograd.grad(upper_loss, self.upper_backbone_params + self.head_params), upper_value

    def _implicit_gradient(self, rhs: Sequence[torch.Tensor], hessian_views: tuple[torch.Tensor, torch.Tensor] | None,
                           hessian: HessianVectorOperator | None) -> tuple[tuple[torch.Tensor, ...], SolveReport]:
        """x ≈ (I + H/(λ+δ))⁻¹·v with v averaged over ranks inside; x is identical on every rank."""
        if hessian is None and self.settings.cg_iters > 0:
            if hessian_views is None:
                raise ValueError("upper_step needs hessian_views or a prebuilt hessian operator")
            hessian = self.hessian_operator(hessian_views)
        return implicit_gradient(self.lower_backbone_params, rhs, hessian=hessian, lam=self.settings.lam,
                                 damping=self.settings.cg_damping, cg_iters=self.settings.cg_iters,
                                 solver=self.settings.cg_solver, precision=self.settings.hvp_precision)

    def _set_upper_gradients(self, plain: Sequence[torch.Tensor], head_grad_via_lower: Sequence[torch.Tensor],
                             implicit: Sequence[torch.Tensor]) -> torch.Tensor:
        """θ_D: γ·∇θD L_D(θ_D, φ) + x;  φ: γ·∇φ L_D(θ_D, φ) + ∇φ L_D(θ_P, φ); clipped. Returns the norm."""
        gamma = self.settings.upper_plain_grad_scale
        for param, grad in zip(self.upper_backbone_params + self.head_params, plain):
            param.grad = grad.detach().mul(gamma)
        for param, grad in zip(self.head_params, head_grad_via_lower):
            param.grad.add_(grad)
        all_reduce_gradients_(self.upper_backbone_params + self.head_params)
        for param, x in zip(self.upper_backbone_params, implicit):
            param.grad.add_(x)
        return torch.nn.utils.clip_grad_norm_(self.upper_backbone_params + self.head_params, self.settings.grad_clip)

    def _report_solve(self, report: SolveReport, true_rel_residual: float) -> None:
        """Warn (once per run) when the solve made things worse than x = 0; log residuals with cg_verbose."""
        if true_rel_residual > 1 and not self._warned_cg_growth and get_rank() == 0:
            self._warned_cg_growth = True  # once per run: the metrics file follows it per alternation
            logger.warning(
                "upper step %d: the %s solve is worse than no solve (x = 0): true relative residual "
                "||v - Ax||/||v|| = %.3g > 1 for A = I + H/(lam + delta). A is probably indefinite at this delta: "
                "measure it with `python -m source.tools.curvature`, then use --cg-solver minres and/or a larger "
                "--cg-lam-dampening. This warning is shown once; the metrics hold cg/true_rel_residual "
                "averaged over each alternation's upper steps.",
                self.upper_step_count, report.solver, true_rel_residual)
        if self.settings.cg_verbose:
            logger.info("upper step %d: %s residual norms (recurrence) %s; true relative residual %.3e",
                        self.upper_step_count, report.solver,
                        ", ".join(f"{float(r):.3e}" for r in report.residual_norms), true_rel_residual)

    # ---------------------------------------------------------------------------------------
    def alternation(self, lower_stream: BatchStream, upper_stream: BatchStream) -> dict[str, float]:
        """N_L lower steps, then N_U upper steps (one pretext batch for all their HVPs)."""
        sums: dict[str, float] = {}

        def add(metrics: dict[str, float], count: int) -> None:
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value / count

        for _ in range(self.settings.lower_steps_per_alternation):
            (view1, view2), _ = next(lower_stream)
            add(self.lower_step(view1, view2), self.settings.lower_steps_per_alternation)
        # Drawn with or without an upper level, so the control reads the same pretext batches as
        # BiSSL (same images, and the same views: augmentations follow per-sample seeds).
        hessian_views, _ = next(lower_stream)
        # One Hessian graph for all upper steps: θ_P and ψ stay fixed while they run.
        share = self.settings.share_hessian_graph and self.settings.cg_iters > 0 and self.settings.upper_level
        hessian = self.hessian_operator(hessian_views) if share else None
        for _ in range(self.settings.upper_steps_per_alternation if self.settings.upper_level else 0):
            images, targets = next(upper_stream)
            add(self.upper_step(images, targets, hessian_views, hessian), self.settings.upper_steps_per_alternation)
        del hessian  # free the pretext batch's activations before evaluation
        # Per-rank BN statistics diverge with per-rank data; average them so every rank (and
        # the saved model) holds the same state.
        all_reduce_buffers_(self.lower_model)
        all_reduce_buffers_(self.upper_backbone)
        sums["distance"] = float(backbone_distance(self.lower_backbone_params, self.upper_backbone_params))
        sums["coupling/relative_distance"] = float(relative_distance(self.lower_backbone_params, self.upper_backbone_params))
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {
            "lower_model": self.lower_model.state_dict(), "upper_backbone": self.upper_backbone.state_dict(),
            "head": self.head.state_dict(),
            "lower_optimizer": self.lower_optimizer.state_dict(), "lower_scheduler": self.lower_scheduler.state_dict(),
            "upper_optimizer": self.upper_optimizer.state_dict(), "upper_scheduler": self.upper_scheduler.state_dict(),
            "lower_step_count": self.lower_step_count, "upper_step_count": self.upper_step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lower_model.load_state_dict(state["lower_model"])
        self.upper_backbone.load_state_dict(state["upper_backbone"])
        self.head.load_state_dict(state["head"])
        self.lower_optimizer.load_state_dict(state["lower_optimizer"])
        self.lower_scheduler.load_state_dict(state["lower_scheduler"])
        self.upper_optimizer.load_state_dict(state["upper_optimizer"])
        self.upper_scheduler.load_state_dict(state["upper_scheduler"])
        self.lower_step_count = state["lower_step_count"]
        self.upper_step_count = state["upper_step_count"]
