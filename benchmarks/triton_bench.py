"""The Triton path of the ScaleGrad loss on a GPU: its correctness against the
torch path, then, in one run, its speed and memory next to the torch path,
PyTorch's cross-entropy and Liger-Kernel's cross-entropy (when installed).

    python benchmarks/triton_bench.py              # a CUDA GPU; results in benchmarks/results/
    python benchmarks/triton_bench.py --quick      # small shapes, a smoke run
    python benchmarks/triton_bench.py --only check # the correctness checks alone
    TRITON_INTERPRET=1 python benchmarks/triton_bench.py --device cpu  # tiny, a harness smoke test

Writes ``benchmarks/results/<name>.json`` and ``.md`` (``--name`` defaults to
``cuda-<card>-triton``). Every time is the median of several calls after a
warm-up, the host included (synchronised wall clock); peak memory is the
allocator's peak over what was allocated before the call (gradients freed).

The floors (issue 13): ScaleGrad forward + backward through Triton takes at most
1.0x the time of PyTorch's cross-entropy at every shape, and at most 1.3x
Liger-Kernel's; its peak memory is at most the torch path's.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run import gpt2_model, peak_memory_cuda, timed, write_results  # noqa: E402  (benchmarks/run.py)

from scalegrad.fused import fused_linear_scalegrad_loss  # noqa: E402
from scalegrad.losses import scalegrad_loss  # noqa: E402

GAMMA = 0.2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def liger_cross_entropy():
    """Liger-Kernel's cross-entropy (summed), or None when it does not import."""
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except Exception as error:  # not installed, or not for this Triton
        print(f"Liger-Kernel unavailable: {error}", flush=True)
        return None

    def loss(logits, target):
        return LigerCrossEntropyFunction.apply(
            logits.view(-1, logits.shape[-1]), target.view(-1), None, -100, 0.0, 0.0, "sum")[0]
    return loss


def losses_to_compare(liger):
    out = {
        "cross_entropy": lambda logits, target: F.cross_entropy(
            logits.view(-1, logits.shape[-1]), target.view(-1), reduction="sum"),
        "scalegrad_torch": lambda logits, target: scalegrad_loss(logits, target, GAMMA, impl="torch"),
        "scalegrad_triton": lambda logits, target: scalegrad_loss(logits, target, GAMMA, impl="triton"),
    }
    if liger is not None:
        out["liger_cross_entropy"] = liger
    return out


def _ratio(a, b):
    return a / b if b else float("nan")


def peak_memory(fn, device, reset):
    """Peak bytes that ``fn()`` adds on a GPU (0 on the CPU: not measured there)."""
    if device.type != "cuda":
        fn()
        return 0
    return peak_memory_cuda(fn, device, reset)


# --------------------------------------------------------------------------- #
# correctness on the GPU
# --------------------------------------------------------------------------- #

def check(device, cases):
    """The Triton path against the torch path on the same inputs (``cases``:
    ``(batch, time, vocab, ignore_index)``); one row per case and dtype."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for batch, time_, vocab, ignore_index in cases:
        for name, dtype in DTYPES.items():
            logits = (3 * torch.randn(batch, time_, vocab, device=device, generator=g)).to(dtype)
            target = torch.randint(0, min(vocab, 500), (batch, time_), device=device, generator=g)
            if ignore_index is not None:
                target[-1, -20:] = ignore_index
                target[0, 3] = ignore_index
            results = {}
            for impl in ("torch", "triton"):
                x = logits.clone().requires_grad_()
                losses = scalegrad_loss(x, target, GAMMA, ignore_index=ignore_index, reduction="none", impl=impl)
                weight = torch.rand(losses.shape, device=device, generator=torch.Generator(device=device).manual_seed(1))
                (losses * weight).sum().backward()
                results[impl] = (losses.detach(), x.grad.float())
            (l_tri, g_tri), (l_ref, g_ref) = results["triton"], results["torch"]
            loss_rel = ((l_tri - l_ref).abs().max() / l_ref.abs().max().clamp_min(1e-30)).item()
            total_rel = abs(l_tri.sum().item() - l_ref.sum().item()) / max(abs(l_ref.sum().item()), 1e-30)
            grad_rel = ((g_tri - g_ref).abs().max() / g_ref.abs().max()).item()
            ok = loss_rel < 1e-5 and total_rel < 1e-5 and grad_rel < (1e-5 if dtype == torch.float32 else 1e-2)
            rows.append({"shape": [batch, time_, vocab], "dtype": name, "ignore_index": ignore_index,
                         "loss_max_rel_diff": loss_rel, "sum_rel_diff": total_rel,
                         "grad_max_diff_over_max": grad_rel, "ok": ok})
            print(f"[check] {batch}x{time_}x{vocab} {name} ignore={ignore_index}: loss {loss_rel:.1e}, "
                  f"sum {total_rel:.1e}, grad {grad_rel:.1e} {'ok' if ok else 'MISMATCH'}", flush=True)
    # The fused-linear path on the GPU against the plain loss.
    h = torch.randn(2, 257, 64, device=device, generator=g, requires_grad=True)
    w = torch.randn(1000, 64, device=device, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (2, 257), device=device, generator=g)
    fused = fused_linear_scalegrad_loss(h, w, t, GAMMA, chunk_size=100)
    grads_fused = torch.autograd.grad(fused, (h, w))
    plain = scalegrad_loss(h @ w.t(), t, GAMMA, impl="torch")
    grads_plain = torch.autograd.grad(plain, (h, w))
    fused_rel = abs(fused.item() - plain.item()) / plain.item()
    fused_grad = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads_fused, grads_plain))
    ok = fused_rel < 1e-5 and fused_grad < 1e-4
    rows.append({"shape": [2, 257, 1000], "dtype": "fp32", "fused_linear": True,
                 "sum_rel_diff": fused_rel, "grad_max_diff_over_max": fused_grad, "ok": ok})
    print(f"[check] fused-linear vs plain: sum {fused_rel:.1e}, grad {fused_grad:.1e} {'ok' if ok else 'MISMATCH'}",
          flush=True)
    return rows


# --------------------------------------------------------------------------- #
# the loss alone
# --------------------------------------------------------------------------- #

def bench_losses(shapes, dtypes, device, reps, liger):
    rows = []
    functions = losses_to_compare(liger)
    for shape in shapes:
        for dtype_name in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            logits = torch.randn(*shape, device=device, generator=g).to(DTYPES[dtype_name])
            target = torch.randint(0, min(shape[-1], 500), shape[:2], device=device, generator=g)
            times, mems = {}, {}
            for name, fn in functions.items():
                # Liger writes the gradient over its input: give it its own copy.
                x = (logits.clone() if name == "liger_cross_entropy" else logits).requires_grad_()

                def step(fn=fn, x=x):
                    x.grad = None
                    fn(x, target).backward()

                times[name] = timed(step, device, reps, warmup=2)
                mems[name] = peak_memory(step, device, lambda x=x: setattr(x, "grad", None))
                x.grad = None
                del x
            del logits
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row = {"shape": list(shape), "dtype": dtype_name, "seconds": times, "peak_bytes": mems,
                   "triton_vs_cross_entropy": times["scalegrad_triton"] / times["cross_entropy"],
                   "triton_vs_torch_path": times["scalegrad_triton"] / times["scalegrad_torch"],
                   "memory_triton_vs_torch_path": _ratio(mems["scalegrad_triton"], mems["scalegrad_torch"])}
            if "liger_cross_entropy" in times:
                row["triton_vs_liger"] = times["scalegrad_triton"] / times["liger_cross_entropy"]
            rows.append(row)
            print(f"[loss] {shape} {dtype_name}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items())
                  + "; peak MiB " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mems.items()), flush=True)
    return rows


# --------------------------------------------------------------------------- #
# a GPT-2-small training step
# --------------------------------------------------------------------------- #

def bench_train_step(cfg, device, reps, liger):
    functions = losses_to_compare(liger)
    model = gpt2_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["time"] + 1, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, min(cfg["vocab"], 500), (cfg["batch"], cfg["time"] + 1), generator=g).to(device)
    inp, target = batch[:, :-1], batch[:, 1:].contiguous()
    dtype = DTYPES[cfg["autocast"]] if cfg["autocast"] else None

    def step_fn(name):
        def run():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if name == "fused_scalegrad":
                    hidden = model.transformer(inp).last_hidden_state
                    loss = fused_linear_scalegrad_loss(hidden, model.lm_head.weight, target, GAMMA)
                else:
                    logits = model(inp).logits
                    loss = functions[name](logits, target)
            (loss / target.numel()).backward()
            optimizer.step()
        return run

    names = [*functions, "fused_scalegrad"]
    times = {name: timed(step_fn(name), device, reps, warmup=2) for name in names}
    mems = {name: peak_memory(step_fn(name), device, lambda: optimizer.zero_grad(set_to_none=True))
            for name in names}
    row = {"config": cfg, "seconds": times, "peak_bytes": mems,
           "triton_vs_cross_entropy": times["scalegrad_triton"] / times["cross_entropy"],
           "triton_vs_torch_path": times["scalegrad_triton"] / times["scalegrad_torch"],
           "memory_triton_vs_torch_path": _ratio(mems["scalegrad_triton"], mems["scalegrad_torch"])}
    if "liger_cross_entropy" in times:
        row["triton_vs_liger"] = times["scalegrad_triton"] / times["liger_cross_entropy"]
    print(f"[train step] {cfg}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())
          + "; peak MiB " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mems.items()), flush=True)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #

FLOORS = {"triton_vs_cross_entropy": 1.0, "triton_vs_liger": 1.3, "memory_triton_vs_torch_path": 1.0}


def floors_met(rows):
    """Per floor: True (met at every shape), False, or None (not measured)."""
    out = {}
    for key, limit in FLOORS.items():
        values = [row[key] for row in rows if key in row]
        out[key] = all(v <= limit for v in values) if values else None
    return out


def markdown(results):
    lines = [f"Machine: {results['machine']}. Command: `{results['command']}`.", ""]
    if results.get("check"):
        bad = [r for r in results["check"] if not r["ok"]]
        lines += [f"Correctness (Triton vs torch path, fp32/bf16/fp16, {len(results['check'])} cases): "
                  + ("all within tolerance." if not bad else f"{len(bad)} MISMATCHES."), ""]
    names = ["scalegrad_triton", "scalegrad_torch", "cross_entropy", "liger_cross_entropy"]
    if results.get("loss"):
        lines += ["Loss forward + backward (ms; peak MiB over the logits):", "",
                  "| shape | dtype | " + " | ".join(names) + " | Triton / CE | Triton / Liger | memory Triton / torch path |",
                  "|---|---|" + "---|" * (len(names) + 3)]
        for r in results["loss"]:
            cells = [f"{r['seconds'][n] * 1e3:.3f} ms, {r['peak_bytes'][n] / 2**20:.0f} MiB"
                     if n in r["seconds"] else "-" for n in names]
            liger = f"{r['triton_vs_liger']:.3f}x" if "triton_vs_liger" in r else "-"
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | " + " | ".join(cells)
                         + f" | {r['triton_vs_cross_entropy']:.3f}x | {liger} | {r['memory_triton_vs_torch_path']:.3f}x |")
        lines.append("")
    if results.get("train_step"):
        lines += ["Training step (ms; peak MiB):", "", "| config | " + " | ".join(names + ["fused_scalegrad"]) + " |",
                  "|---|" + "---|" * (len(names) + 1)]
        for r in results["train_step"]:
            c = r["config"]
            desc = f"{c['n_layer']}L/{c['n_embd']}d, {c['batch']}x{c['time']}, V={c['vocab']}, autocast {c['autocast']}"
            cells = [f"{r['seconds'][n] * 1e3:.2f} ms, {r['peak_bytes'][n] / 2**20:.0f} MiB"
                     if n in r["seconds"] else "-" for n in names + ["fused_scalegrad"]]
            lines.append(f"| {desc} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("floors"):
        lines.append("Floors (loss alone): " + ", ".join(
            f"{k} <= {FLOORS[k]}: {'not measured' if v is None else 'met' if v else 'MISSED'}"
            for k, v in results["floors"].items()))
    return "\n".join(lines) + "\n"


# shapes per mode: loss (batch, time, vocab); dtypes; the training step; the check cases
MODES = {
    "full": dict(
        shapes=[(1, 300, 50257), (8, 1024, 50257), (4, 2048, 128256)], dtypes=["fp32", "bf16"],
        train=dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, batch=8, time=1024, autocast="bf16"),
        check=[(2, 300, 50257, -100), (3, 64, 1000, None), (2, 700, 50, 7), (1, 1, 50257, None),
               (2, 129, 128256, None)]),
    "quick": dict(
        shapes=[(1, 300, 50257)], dtypes=["fp32", "bf16"],
        train=dict(n_layer=2, n_embd=128, n_head=2, vocab=50257, batch=2, time=256, autocast="bf16"),
        check=[(2, 300, 50257, -100), (2, 70, 50, 7)]),
    # Triton's interpreter on the CPU: only that the harness runs; the figures mean nothing.
    "cpu": dict(
        shapes=[(1, 6, 37)], dtypes=["fp32"],
        train=dict(n_layer=1, n_embd=16, n_head=2, vocab=37, batch=1, time=6, autocast=None),
        check=[(1, 24, 37, -100)]),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--name", default=None, help="results file name (default: cuda-<card>-triton)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--only", default=None, help="comma list of: check,loss,train")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here: benchmarks/triton_bench.py measures the Triton kernels on a GPU "
              "(TRITON_INTERPRET=1 ... --device cpu runs the harness alone)", file=sys.stderr)
        return 2
    import triton

    from scalegrad import triton_scalegrad

    if device.type == "cpu" and not triton_scalegrad.INTERPRETED:
        print("error: --device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    mode = MODES["cpu" if device.type == "cpu" else "quick" if args.quick else "full"]
    only = set(args.only.split(",")) if args.only else {"check", "loss", "train"}
    reps = args.reps or (2 if device.type == "cpu" else 5 if args.quick else 20)
    liger = liger_cross_entropy() if device.type == "cuda" else None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    results = {
        "machine": f"{card}, torch {torch.__version__}, triton {triton.__version__}"
                   + (f", liger-kernel {_version('liger-kernel')}" if liger else ", no Liger-Kernel"),
        "command": "python benchmarks/triton_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "reps": reps,
    }
    if "check" in only:
        results["check"] = check(device, mode["check"])
    if "loss" in only:
        results["loss"] = bench_losses(mode["shapes"], mode["dtypes"], device, reps, liger)
        results["floors"] = floors_met(results["loss"])
    if "train" in only:
        results["train_step"] = [bench_train_step(mode["train"], device, max(2, reps // 4), liger)]

    name = args.name or ("cpu-triton-interpreter" if device.type == "cpu" else
                         "cuda-" + re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
                         + ("-triton-quick" if args.quick else "-triton"))
    write_results(results, Path(args.out_dir), name, markdown)
    return 1 if any(not r["ok"] for r in results.get("check", [])) else 0


def _version(package):
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
