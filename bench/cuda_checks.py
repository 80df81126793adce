"""CUDA checks with asserted values: the GPU paths that the CPU test suite cannot reach.

    python bench/cuda_checks.py                 # on a machine with a GPU; about 30 s
    python bench/cuda_checks.py --device cpu    # a dry run of the script itself (no pinning)

1. Hessian-vector products (graph reuse and recomputation) and one MINRES/CG implicit solve of
   a small SimCLR model on the GPU equal the same computation on the CPU (float64, 1e-9).
2. The reused-graph HVP equals the recomputed one on the GPU at float32 (1e-4 relative).
3. A SimCLR training step under bf16 autocast gives a finite loss close to fp32's, and leaves
   finite parameters.
4. channels_last gives the fp32 forward of the contiguous layout (1e-4 relative).
5. A BatchStream with pinned memory and 2 workers delivers pinned batches that copy to the GPU
   non-blockingly and equal the ``num_workers=0`` stream's batches exactly.

Exits non-zero at the first failed check; prints one line per check.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from source.data import build_pretext_dataset, pretext_transform, subsample  # noqa: E402
from source.data.stream import BatchStream  # noqa: E402
from source.maths.bilevel import HessianVectorOperator, frozen_batch_norm_statistics, hessian_vector_product, implicit_gradient  # noqa: E402
from source.maths.models import build_backbone  # noqa: E402
from source.stages.pretext import SimCLR  # noqa: E402


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.double().cpu() - y.double().cpu()).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.double().cpu().norm() ** 2) for y in b) ** 0.5
    return num / max(den, 1e-300)


def simclr(device: torch.device, dtype: torch.dtype = torch.float32, arch: str = "resnet18") -> SimCLR:
    torch.manual_seed(0)
    backbone, dim = build_backbone(arch, cifar_stem=True)
    return SimCLR(backbone, dim, "64-64", 0.5).to(device, dtype)


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the script")
    gpu = torch.device(parser.parse_args().device)
    if gpu.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else "CPU dry run"
    print(f"torch {torch.__version__}, {name}, cuDNN {torch.backends.cudnn.version()}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()

    # 1. float64 HVPs and an implicit solve: GPU == CPU.
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 16, 16, generator=generator, dtype=torch.float64) for _ in range(2)]
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
    errors = [relative_error(cuda[i], cpu[i]) for i in range(4)]
    check("float64 HVP / solves, GPU vs CPU", max(errors) < 1e-9,
          f"relative errors shared {errors[0]:.1e}, recomputed {errors[1]:.1e}, minres x {errors[2]:.1e}, cg x {errors[3]:.1e}; "
          f"minres true residual GPU {cuda[4]:.3g} vs CPU {cpu[4]:.3g}")

    # 2. float32 on the GPU: reused graph == recomputation.
    model = simclr(gpu).train()
    params = list(model.backbone.parameters())
    vectors = [torch.randn_like(p) for p in params]
    batch = [v.float().to(gpu) for v in views]
    with frozen_batch_norm_statistics(model):
        shared = HessianVectorOperator(lambda: model(*batch, gather_across_ranks=False), params)(vectors)
        recomputed = hessian_vector_product(lambda: model(*batch, gather_across_ranks=False), params, vectors)
    error = relative_error(shared, recomputed)
    check("float32 HVP on the GPU, graph reuse vs recomputation", error < 1e-4, f"relative error {error:.1e}")

    # 3. bf16 autocast step: finite, close to fp32.
    losses = {}
    for dtype in (None, torch.bfloat16):
        model = simclr(gpu).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with torch.autocast(gpu.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(*batch, gather_across_ranks=False)
        loss.backward()
        optimizer.step()
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        losses[str(dtype)] = (float(loss.detach()), finite)
    (fp32, fp32_ok), (bf16, bf16_ok) = losses.values()
    check("bf16 autocast SimCLR step", fp32_ok and bf16_ok and abs(bf16 - fp32) < 0.02 * abs(fp32),
          f"loss fp32 {fp32:.5f}, bf16 {bf16:.5f}; parameters finite after the step")

    # 4. channels_last forward == contiguous forward (fp32, eval mode).
    model = simclr(gpu).eval()
    images = torch.randn(16, 3, 32, 32, device=gpu)
    with torch.no_grad():
        reference = model.backbone(images)
        model_cl = model.to(memory_format=torch.channels_last)
        result = model_cl.backbone(images.to(memory_format=torch.channels_last))
    error = relative_error([result], [reference])
    check("channels_last forward", error < 1e-4, f"relative error {error:.1e}")

    # 5. pinned, multi-worker BatchStream == in-process stream; non-blocking copies.
    dataset = subsample(build_pretext_dataset("fashionmnist", ROOT / "data", pretext_transform(32, 0.5)), 256, seed=0,
                        stratify=False)
    pin = gpu.type == "cuda"
    pinned = BatchStream(dataset, 32, seed=3, num_workers=2, pin_memory=pin)
    plain = BatchStream(dataset, 32, seed=3, num_workers=0)
    for _ in range(3):
        (a1, a2), labels_a = next(pinned)
        (b1, b2), labels_b = next(plain)
        assert not pin or (a1.is_pinned() and a2.is_pinned()), "batches from a pin_memory stream are not pinned"
        on_gpu = a1.to(gpu, non_blocking=True)
        if pin:
            torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), b1) and torch.equal(a2, b2) and torch.equal(labels_a, labels_b)
    pinned.close()
    plain.close()
    check("pinned 2-worker stream", True, "3 batches pinned, copied non-blocking, identical to the 0-worker stream")
    print(f"all CUDA checks passed in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
