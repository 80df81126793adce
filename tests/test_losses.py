"""NT-Xent against a direct per-anchor formula, and its 2-process behaviour."""
import math

import pytest
import torch
import torch.nn.functional as F

from source.maths.losses import byol_loss, nt_xent_loss
from tests.distributed_harness import run_in_processes


def direct_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """Loop over anchors: -log exp(s_ip / t) / sum_{k != i} exp(s_ik / t), averaged."""
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(float(u[i] @ u[positive]) / t)
        denominator = sum(math.exp(float(u[i] @ u[k]) / t) for k in range(2 * n) if k != i)
        losses.append(-math.log(numerator / denominator))
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


def test_nt_xent_matches_direct_formula():
    torch.manual_seed(0)
    for n, d, t in [(4, 8, 0.5), (7, 3, 0.1), (1, 5, 1.0)]:
        z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
        assert torch.allclose(nt_xent_loss(z1, z2, t), direct_nt_xent(z1, z2, t), atol=1e-10)


def test_nt_xent_is_low_for_matching_views():
    z = torch.randn(16, 32)
    assert nt_xent_loss(z, z + 1e-3 * torch.randn_like(z), 0.1) < nt_xent_loss(z, torch.randn_like(z), 0.1)


def _two_rank_nt_xent(rank, world_size, x, weight):
    """Each rank projects its half of x with a shared linear map; grads are averaged like DDP."""
    half = x.shape[1] // world_size
    w = weight.clone().requires_grad_(True)
    local = x[:, rank * half:(rank + 1) * half]  # (2, N/2, D): two views of this rank's samples
    loss = nt_xent_loss(local[0] @ w, local[1] @ w, 0.3)
    loss.backward()
    grad = w.grad.clone()
    torch.distributed.all_reduce(grad)
    return loss.item(), (grad / world_size)


@pytest.mark.multiprocess
def test_nt_xent_two_processes_equal_one_process_on_global_batch():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 5, dtype=torch.float64)  # (views, global batch, features)
    weight = torch.randn(5, 4, dtype=torch.float64)
    w = weight.clone().requires_grad_(True)
    reference = nt_xent_loss(x[0] @ w, x[1] @ w, 0.3)
    reference.backward()
    results = run_in_processes(_two_rank_nt_xent, 2, args=(x, weight))
    for loss, grad in results:
        assert abs(loss - reference.item()) < 1e-10
        assert torch.allclose(grad, w.grad, atol=1e-10)


def test_byol_loss_formula_and_no_target_gradient():
    p = torch.randn(5, 7, requires_grad=True)
    z = torch.randn(5, 7, requires_grad=True)
    loss = byol_loss(p, z)
    expected = (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1)).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert z.grad is None and p.grad is not None
