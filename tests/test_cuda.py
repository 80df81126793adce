"""The GPU paths the CPU tests cannot reach, with asserted values. Skipped without CUDA; run on a
GPU machine by ``bash bench/cuda_run.sh`` (or ``pytest -m gpu tests/test_cuda.py``).

1. Hessian-vector products (graph reuse and recomputation) and MINRES / CG implicit solves of a
   small SimCLR model on the GPU equal the same computation on the CPU (float64, 1e-9 relative).
2. The reused-graph HVP equals the recomputed one on the GPU at float32 (1e-4 relative).
3. A SimCLR training step under bf16 autocast gives a finite loss within 2 % of fp32's and leaves
   finite parameters.
4. channels_last gives the fp32 forward of the contiguous layout (1e-4 relative).
5. A BatchStream with pinned memory and 2 workers delivers pinned batches that copy to the GPU
   non-blockingly and equal the ``num_workers=0`` stream's batches exactly.
"""
from __future__ import annotations

import pytest
import torch

from source.data import build_pretext_dataset, pretext_transform, subsample
from source.data.stream import BatchStream
from source.maths.bilevel import HessianVectorOperator, frozen_batch_norm_statistics, hessian_vector_product, implicit_gradient
from source.maths.models import build_backbone
from source.stages.pretext import SimCLR
from tests.script_helpers import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def gpu() -> torch.device:
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, cuDNN {torch.backends.cudnn.version()}")
    return device


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 matmuls would blur the float32 comparisons; restore the caller's setting after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.double().cpu() - y.double().cpu()).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.double().cpu().norm() ** 2) for y in b) ** 0.5
    return num / max(den, 1e-300)


def simclr(device: torch.device, dtype: torch.dtype = torch.float32) -> SimCLR:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", cifar_stem=True)
    return SimCLR(backbone, dim, "64-64", 0.5).to(device, dtype)


def two_views(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 16, 16, generator=generator, dtype=dtype) for _ in range(2)]


def test_float64_hvps_and_solves_on_the_gpu_equal_the_cpus(gpu):
    views = two_views()
    results = []
    for device in (torch.device("cpu"), gpu):
        model = simclr(device, torch.float64).train()
        params = list(model.backbone.parameters())
        vectors = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(device)
                   for i, p in enumerate(params)]
        batch = [v.to(device) for v in views]

        def loss(model=model, batch=batch):
            return model(*batch, gather_across_ranks=False)

        with frozen_batch_norm_statistics(model):
            hessian = HessianVectorOperator(loss, params)
            shared = hessian(vectors)
            recomputed = hessian_vector_product(loss, params, vectors)
            x_minres, report = implicit_gradient(params, vectors, hessian=hessian, lam=0.001, damping=5000.0,
                                                 cg_iters=4, solver="minres")
            x_cg, _ = implicit_gradient(params, vectors, hessian=hessian, lam=0.001, damping=5000.0,
                                        cg_iters=4, solver="global")
        results.append((shared, recomputed, x_minres, x_cg, float(report.true_rel_residual)))
    cpu, cuda = results
    errors = {name: relative_error(cuda[i], cpu[i]) for i, name in enumerate(("shared", "recomputed", "minres x", "cg x"))}
    print(f"relative errors {errors}; minres true residual GPU {cuda[4]:.3g} vs CPU {cpu[4]:.3g}")
    assert max(errors.values()) < 1e-9, errors


def test_float32_graph_reuse_equals_recomputation_on_the_gpu(gpu):
    model = simclr(gpu).train()
    params = list(model.backbone.parameters())
    vectors = [torch.randn_like(p) for p in params]
    batch = [v.float().to(gpu) for v in two_views()]
    with frozen_batch_norm_statistics(model):
        shared = HessianVectorOperator(lambda: model(*batch, gather_across_ranks=False), params)(vectors)
        recomputed = hessian_vector_product(lambda: model(*batch, gather_across_ranks=False), params, vectors)
    assert relative_error(shared, recomputed) < 1e-4


def test_a_bf16_autocast_step_is_finite_and_close_to_fp32(gpu):
    batch = [v.float().to(gpu) for v in two_views()]
    losses = {}
    for dtype in (None, torch.bfloat16):
        model = simclr(gpu).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with torch.autocast(gpu.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(*batch, gather_across_ranks=False)
        loss.backward()
        optimizer.step()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), f"non-finite parameters after a {dtype} step"
        losses[dtype] = float(loss.detach())
    fp32, bf16 = losses[None], losses[torch.bfloat16]
    print(f"loss fp32 {fp32:.5f}, bf16 {bf16:.5f}")
    assert abs(bf16 - fp32) < 0.02 * abs(fp32)


def test_channels_last_forward_equals_contiguous(gpu):
    model = simclr(gpu).eval()
    images = torch.randn(16, 3, 32, 32, device=gpu)
    with torch.no_grad():
        reference = model.backbone(images)
        result = model.to(memory_format=torch.channels_last).backbone(images.to(memory_format=torch.channels_last))
    assert relative_error([result], [reference]) < 1e-4


def test_a_pinned_two_worker_stream_equals_the_in_process_one(gpu):
    dataset = subsample(build_pretext_dataset("fashionmnist", ROOT / "data", pretext_transform(32, 0.5)), 256, seed=0,
                        stratify=False)
    pinned = BatchStream(dataset, 32, seed=3, num_workers=2, pin_memory=True)
    plain = BatchStream(dataset, 32, seed=3, num_workers=0)
    try:
        for _ in range(3):
            (a1, a2), labels_a = next(pinned)
            (b1, b2), labels_b = next(plain)
            assert a1.is_pinned() and a2.is_pinned(), "batches from a pin_memory stream are not pinned"
            on_gpu = a1.to(gpu, non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(on_gpu.cpu(), b1) and torch.equal(a2, b2) and torch.equal(labels_a, labels_b)
    finally:
        pinned.close()
        plain.close()
