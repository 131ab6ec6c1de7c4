#!/usr/bin/env bash
# The device check: CUDA paths of the loss (the Triton kernels where Triton imports),
# then the benchmark suites on the GPU.
# Run on a lent GPU machine (see docs/benchmarks.md); results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 SCALEGRAD_SKIP_FAIRSEQ=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python - <<'PY'
import torch
from scalegrad.losses import scalegrad_loss
from scalegrad.fused import fused_linear_scalegrad_loss
torch.manual_seed(0)
dev = torch.device("cuda")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    logits = torch.randn(2, 300, 50257).to(dtype)
    target = torch.randint(0, 500, (2, 300)); target[1, -20:] = 7
    ref_logits = logits.float().clone().requires_grad_()
    ref = scalegrad_loss(ref_logits, target, 0.2, ignore_index=7); ref.backward()
    x = logits.to(dev).requires_grad_()
    out = scalegrad_loss(x, target.to(dev), 0.2, ignore_index=7); out.backward()
    assert out.dtype == torch.float32
    rel = abs(out.item() - ref.item()) / abs(ref.item())
    gerr = (x.grad.float().cpu() - ref_logits.grad).abs().max().item()
    print(f"cuda {dtype}: loss rel diff {rel:.2e}, grad max abs diff {gerr:.2e}")
    assert rel < 1e-5 and gerr < (1e-6 if dtype == torch.float32 else 1e-2)
h = torch.randn(2, 257, 64, device=dev, requires_grad=True)
w = torch.randn(1000, 64, device=dev, requires_grad=True)
t = torch.randint(0, 50, (2, 257), device=dev)
f = fused_linear_scalegrad_loss(h, w, t, 0.2, chunk_size=100); gf = torch.autograd.grad(f, (h, w))
p = scalegrad_loss(h @ w.t(), t, 0.2); gp = torch.autograd.grad(p, (h, w))
print("cuda fused vs plain:", abs(f.item() - p.item()) / p.item(), max((a - b).abs().max().item() for a, b in zip(gf, gp)))
assert abs(f.item() - p.item()) / p.item() < 1e-5
PY
python benchmarks/run.py --device cuda 2>&1 | grep -v "^\[transformers\]"
# The Triton kernels against the torch path, PyTorch's and Liger-Kernel's cross-entropy.
# Liger-Kernel travels as a wheel in .whl/ (the GPU machine has no registry; see docs/benchmarks.md).
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/liger .whl/liger_kernel-*.whl \
        && export PYTHONPATH=/tmp/liger${PYTHONPATH:+:$PYTHONPATH}
fi
python benchmarks/triton_bench.py 2>&1 | grep -v "^\[transformers\]"
cp benchmarks/results/cuda-* "$OUT"/ 2>/dev/null || true
