"""The scalegrad benchmark suite: every figure a ratio against a baseline measured
in the same run, the median of several repetitions after a warm-up.

    python benchmarks/run.py                    # CPU, results in benchmarks/results/
    python benchmarks/run.py --device cuda      # a GPU, GPT-2-small-shaped model
    python benchmarks/run.py --quick            # small shapes, seconds (CI smoke)

Writes ``benchmarks/results/<name>.json`` and ``.md`` (``--name`` defaults to
the device kind). Peak memory on CUDA comes from the allocator's statistics;
on the CPU from the peak resident set size of a fresh subprocess per case,
minus its size before the measured call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scalegrad.fused import fused_linear_scalegrad_loss  # noqa: E402
from scalegrad.losses import scalegrad_loss  # noqa: E402
from tests.references import original_scalegrad_loss  # noqa: E402


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps, warmup=1):
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_cuda(fn, device, reset):
    """Peak bytes that ``fn()`` adds; ``reset()`` frees the gradients first so
    that the measured call does not start by freeing and reusing them."""
    fn()  # warm-up: allocator caches, cuBLAS workspaces, optimizer state
    reset()
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_memory_cpu_subprocess(case: str, shape: tuple, extra: list[str]):
    """Run one memory case in a fresh interpreter; returns bytes."""
    cmd = [sys.executable, __file__, "--memory-case", case, "--shape", ",".join(map(str, shape)), *extra]
    # A fixed mmap threshold makes glibc return every large block to the
    # system when it is freed, so the resident set follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- #
# 1. the loss alone
# --------------------------------------------------------------------------- #

LOSSES = {
    "cross_entropy": lambda logits, target: F.cross_entropy(
        logits.view(-1, logits.shape[-1]), target.view(-1), reduction="sum"),
    "scalegrad": lambda logits, target: scalegrad_loss(logits, target, 0.2),
    # docs/reference.md, section 1, as the original computes it (dense (B, T, V) mask)
    "dense": lambda logits, target: original_scalegrad_loss(logits, target, 0.2),
}


def loss_inputs(shape, device, seed=0):
    batch, time_, vocab = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(batch, time_, vocab, generator=g).to(device).requires_grad_()
    # Natural-text-like repetition: ids drawn from a few hundred frequent ones.
    target = torch.randint(0, min(vocab, 500), (batch, time_), generator=g).to(device)
    return logits, target


def loss_step(name, logits, target):
    def run():
        logits.grad = None
        LOSSES[name](logits, target).backward()
    return run


def bench_losses(shapes, device, reps, include_dense=True):
    rows = []
    for shape in shapes:
        logits, target = loss_inputs(shape, device)
        times = {}
        for name in LOSSES:
            if name == "dense" and not include_dense:
                continue
            times[name] = timed(loss_step(name, logits, target), device, reps)
        mems = {}
        for name in times:
            if device.type == "cuda":
                mems[name] = peak_memory_cuda(loss_step(name, logits, target), device,
                                              lambda: setattr(logits, "grad", None))
            else:
                mems[name] = peak_memory_cpu_subprocess(f"loss:{name}", shape, [])
        del logits, target
        row = {
            "shape": list(shape),
            "seconds": times,
            "peak_bytes": mems,
            "time_vs_cross_entropy": times["scalegrad"] / times["cross_entropy"],
            "memory_vs_cross_entropy": mems["scalegrad"] / mems["cross_entropy"],
        }
        if "dense" in times:
            row["speedup_vs_dense"] = times["dense"] / times["scalegrad"]
            row["memory_dense_vs_scalegrad"] = mems["dense"] / mems["scalegrad"]
        rows.append(row)
        print(f"[loss] {shape}: time x{row['time_vs_cross_entropy']:.3f} of CE, "
              f"memory x{row['memory_vs_cross_entropy']:.3f} of CE"
              + (f", {row['speedup_vs_dense']:.1f}x faster than dense" if "dense" in times else ""),
              flush=True)
    return rows


# --------------------------------------------------------------------------- #
# 2. one training step of a GPT-2-shaped model
# --------------------------------------------------------------------------- #

def gpt2_model(n_layer, n_embd, n_head, vocab, n_positions, device, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                        n_positions=n_positions, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return GPT2LMHeadModel(config).to(device)


def train_step_fn(model, optimizer, batch, objective):
    inp, target = batch[:, :-1], batch[:, 1:]

    def run():
        optimizer.zero_grad(set_to_none=True)
        if objective == "fused":
            hidden = model.transformer(inp).last_hidden_state
            loss = fused_linear_scalegrad_loss(hidden, model.lm_head.weight, target, 0.2)
        else:
            logits = model(inp).logits
            if objective == "mle":
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       reduction="sum")
            else:
                loss = scalegrad_loss(logits, target, 0.2)
        (loss / target.numel()).backward()
        optimizer.step()
    return run


def bench_train_step(cfg, device, reps):
    model = gpt2_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["time"] + 1, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, min(cfg["vocab"], 500), (cfg["batch"], cfg["time"] + 1), generator=g).to(device)
    times = {obj: timed(train_step_fn(model, optimizer, batch, obj), device, reps)
             for obj in ("mle", "scalegrad")}
    row = {"config": cfg, "seconds": times, "scalegrad_vs_mle": times["scalegrad"] / times["mle"]}
    print(f"[train step] {cfg}: ScaleGrad x{row['scalegrad_vs_mle']:.3f} of MLE", flush=True)
    return row


def bench_driver_step(cfg, device, reps):
    """The GPT-2 driver's training step on one chunk, as the trainer runs it (the
    StepModel forward with the step's logged metrics, backward, optimizer step): the
    plain ScaleGrad step, the --fused-loss step (statistics from the loss's own pass),
    and the fused step as it was before (a second no-grad matmul for the statistics).
    The variants run in turn within each repetition, so load drifts hit them alike."""
    from argparse import Namespace

    from scalegrad.fused import chunked_logit_statistics
    from scalegrad.gpt2.objectives import StepModel
    from scalegrad.gpt2.runtime import Runtime
    from scalegrad.metrics import ranking_metrics_from_ranks

    model = gpt2_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["time"] + 1,
                       device).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    runtime = Runtime(device=device, progress=False)
    step_model = StepModel(model, Namespace(gamma=0.2, fused_chunk_size=256), runtime)
    g = torch.Generator().manual_seed(2)
    chunk = torch.randint(0, min(cfg["vocab"], 500), (cfg["time"] + 1,), generator=g).to(device)

    def step(objective):
        def run():
            optimizer.zero_grad(set_to_none=True)
            if objective == "fused_two_pass":
                inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
                hidden = model.transformer(input_ids=inp).last_hidden_state
                loss = fused_linear_scalegrad_loss(hidden, model.lm_head.weight, target, 0.2)
                stats = chunked_logit_statistics(hidden, model.lm_head.weight, None, target, 256,
                                                 nll=False)
                ranking_metrics_from_ranks(stats["higher"], stats["predictions"], target[0])
                loss = loss / target.numel()
            else:
                loss, _ = step_model(chunk, objective)
            loss.backward()
            optimizer.step()
        return run

    names = ("token", "fused", "fused_two_pass")
    fns = {name: step(name) for name in names}
    for fn in fns.values():
        fn()  # warm-up
    samples = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(values) for name, values in samples.items()}
    row = {"config": cfg, "seconds": times, "fused_vs_plain": times["fused"] / times["token"],
           "two_pass_vs_plain": times["fused_two_pass"] / times["token"]}
    print(f"[driver step] {cfg}: fused x{row['fused_vs_plain']:.3f} of the plain step "
          f"(two passes, as before: x{row['two_pass_vs_plain']:.3f})", flush=True)
    return row


def bench_fused_memory(cfg, device):
    """Peak memory of a training step at a long sequence: fused vs plain."""
    shape = (cfg["batch"], cfg["time"], cfg["vocab"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"])
    mems = {}
    for obj in ("scalegrad", "fused"):
        if device.type == "cuda":
            model = gpt2_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["time"] + 1, device)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
            batch = torch.randint(0, 500, (cfg["batch"], cfg["time"] + 1)).to(device)
            mems[obj] = peak_memory_cuda(train_step_fn(model, optimizer, batch, obj), device,
                                         lambda: optimizer.zero_grad(set_to_none=True))
            del model, optimizer
        else:
            mems[obj] = peak_memory_cpu_subprocess(f"step:{obj}", shape, [])
    row = {"config": cfg, "peak_bytes": mems, "fused_vs_plain": mems["fused"] / mems["scalegrad"]}
    print(f"[fused] {cfg}: peak memory x{row['fused_vs_plain']:.3f} of the plain ScaleGrad step", flush=True)
    return row


# --------------------------------------------------------------------------- #
# 3. eval-completion: batched vs one chunk (6 prefixes) at a time
# --------------------------------------------------------------------------- #

def bench_completion(cfg, device, reps):
    from scalegrad.data import make_prefixes
    from scalegrad.generation import generate_continuations

    model = gpt2_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"],
                       cfg["prefix"] + cfg["continuation"], device).eval()
    g = torch.Generator().manual_seed(2)
    chunks = torch.randint(0, min(cfg["vocab"], 500), (cfg["chunks"], 301), generator=g)
    prefixes = make_prefixes(chunks, cfg["prefix"]).to(device)
    per_chunk = prefixes.shape[0] // cfg["chunks"]
    outputs = {}

    def one_chunk_at_a_time():
        outputs["loop"] = torch.cat([
            generate_continuations(model, prefixes[i:i + per_chunk], cfg["continuation"])
            for i in range(0, prefixes.shape[0], per_chunk)])

    def batched():
        outputs["batched"] = generate_continuations(model, prefixes, cfg["continuation"],
                                                    batch_size=cfg["batch_size"])

    times = {"one_chunk": timed(one_chunk_at_a_time, device, reps),
             "batched": timed(batched, device, reps)}
    tokens = prefixes.shape[0] * cfg["continuation"]
    row = {
        "config": cfg,
        "description": f"{cfg['n_layer']}L/{cfg['n_embd']}d, {prefixes.shape[0]} prefixes of {cfg['prefix']} "
                       f"+ {cfg['continuation']}, batch {cfg['batch_size']}",
        "tokens_per_second": {k: tokens / v for k, v in times.items()},
        "speedup": times["one_chunk"] / times["batched"],
        "identical": bool(torch.equal(outputs["loop"], outputs["batched"])),
    }
    print(f"[completion] {row['description']}: batched x{row['speedup']:.2f} tokens/s, "
          f"identical outputs: {row['identical']}", flush=True)
    return row


# --------------------------------------------------------------------------- #
# 4. eval-singletoken: all metrics vs a bare forward pass
# --------------------------------------------------------------------------- #

def bench_singletoken(cfg, device, reps):
    from scalegrad.gpt2.evaluate import eval_singletoken
    from scalegrad.gpt2.runtime import Runtime

    model = gpt2_model(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["time"], device).eval()
    g = torch.Generator().manual_seed(3)
    chunks = torch.randint(0, min(cfg["vocab"], 500), (cfg["chunks"], cfg["time"] + 1), generator=g)
    runtime = Runtime(device=device, progress=False)

    @torch.no_grad()
    def bare_forward():
        for chunk in chunks:
            model(input_ids=chunk[:-1].unsqueeze(0).to(device)).logits.float()

    def all_metrics():
        eval_singletoken(model, chunks, runtime)

    times = {"bare_forward": timed(bare_forward, device, reps), "all_metrics": timed(all_metrics, device, reps)}
    row = {
        "config": cfg,
        "description": f"{cfg['n_layer']}L/{cfg['n_embd']}d, {cfg['chunks']} chunks of {cfg['time']}, V={cfg['vocab']}",
        "seconds": times,
        "overhead": times["all_metrics"] / times["bare_forward"],
    }
    print(f"[singletoken] {row['description']}: all metrics x{row['overhead']:.3f} of a bare forward", flush=True)
    return row


def memory_case(case, shape):
    """Child process of peak_memory_cpu_subprocess: prints the peak bytes that
    one call adds over the resident set size before it (Linux: VmHWM is reset
    through /proc/self/clear_refs)."""
    device = torch.device("cpu")
    kind, name = case.split(":")
    if kind == "loss":
        logits, target = loss_inputs(tuple(shape), device)
        fn = loss_step(name, logits, target)
    else:
        batch, time_, vocab, n_layer, n_embd, n_head = shape
        model = gpt2_model(n_layer, n_embd, n_head, vocab, time_ + 1, device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
        data = torch.randint(0, 500, (batch, time_ + 1))
        fn = train_step_fn(model, optimizer, data, name)
    fn()  # warm-up: optimizer state allocated once, as in training
    # Free the gradients now, so that the measured call starts without them
    # (it would free them first and reuse their pages).
    if kind == "loss":
        logits.grad = None
    else:
        optimizer.zero_grad(set_to_none=True)
    before = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    print((_proc_status_kb("VmHWM") - before) * 1024)


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #

def machine_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def markdown(results):
    lines = [f"Machine: {results['machine']}. Command: `{results['command']}`.", ""]
    lines += ["| benchmark | shape / config | measured | ratio |", "|---|---|---|---|"]
    for row in results.get("loss", []):
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"| loss fwd+bwd time | {shape} | ScaleGrad vs cross-entropy | {row['time_vs_cross_entropy']:.3f}x |")
        lines.append(f"| loss fwd+bwd peak memory | {shape} | ScaleGrad vs cross-entropy | {row['memory_vs_cross_entropy']:.3f}x |")
        if "speedup_vs_dense" in row:
            lines.append(f"| loss fwd+bwd time | {shape} | dense (original) vs ScaleGrad | {row['speedup_vs_dense']:.1f}x faster |")
            lines.append(f"| loss fwd+bwd peak memory | {shape} | dense (original) vs ScaleGrad | {row['memory_dense_vs_scalegrad']:.1f}x less |")
    for row in results.get("train_step", []):
        c = row["config"]
        lines.append(f"| training step time | {c['n_layer']}L/{c['n_embd']}d, {c['batch']}x{c['time']}, V={c['vocab']} "
                     f"| ScaleGrad vs MLE | {row['scalegrad_vs_mle']:.3f}x |")
    for row in results.get("driver_step", []):
        c = row["config"]
        shape = f"{c['n_layer']}L/{c['n_embd']}d, 1x{c['time']}, V={c['vocab']}"
        lines.append(f"| driver training step time | {shape} | fused vs plain ScaleGrad "
                     f"| {row['fused_vs_plain']:.3f}x |")
        lines.append(f"| driver training step time | {shape} | fused with a second statistics pass "
                     f"(before) vs plain | {row['two_pass_vs_plain']:.3f}x |")
    for row in results.get("fused_memory", []):
        c = row["config"]
        lines.append(f"| training step peak memory | {c['n_layer']}L/{c['n_embd']}d, {c['batch']}x{c['time']}, V={c['vocab']} "
                     f"| fused vs plain ScaleGrad | {row['fused_vs_plain']:.3f}x |")
    for row in results.get("completion", []):
        lines.append(f"| eval-completion tokens/s | {row['description']} | batched vs one chunk at a time "
                     f"| {row['speedup']:.2f}x (identical outputs: {row['identical']}) |")
    for row in results.get("singletoken", []):
        lines.append(f"| eval-singletoken time | {row['description']} | all metrics vs bare forward "
                     f"| {row['overhead']:.3f}x |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path, name: str, render) -> None:
    """``{out_dir}/{name}.json`` and ``.md`` (``render(results)``), each written atomically;
    the Markdown also printed."""
    from scalegrad.io import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_path(out_dir / f"{name}.md") as tmp:
        tmp.write_text(render(results))
    print(render(results))
    print(f"results written to {out_dir / name}.json and .md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--name", default=None, help="results file name (default: device kind)")
    parser.add_argument("--only", default=None, help="comma list of: loss,train,driver,fused,completion,singletoken")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        memory_case(args.memory_case, [int(x) for x in args.shape.split(",")])
        return 0

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    only = set(args.only.split(",")) if args.only else {"loss", "train", "driver", "fused", "completion",
                                                           "singletoken"}
    reps = args.reps or (3 if args.quick else 5)
    if args.quick:
        loss_shapes = [(1, 64, 5000)]
        train_cfg = dict(n_layer=2, n_embd=64, n_head=2, vocab=5000, batch=1, time=64)
        driver_cfg = dict(n_layer=2, n_embd=64, n_head=2, vocab=5000, time=256)
        fused_cfg = dict(n_layer=1, n_embd=64, n_head=2, vocab=5000, batch=2, time=256)
    elif cuda:
        loss_shapes = [(1, 300, 50257), (4, 512, 50257)]
        train_cfg = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, batch=4, time=512)
        driver_cfg = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, time=1024)
        fused_cfg = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, batch=4, time=1024)
    else:
        loss_shapes = [(1, 300, 50257), (4, 512, 50257)]
        train_cfg = dict(n_layer=4, n_embd=768, n_head=12, vocab=50257, batch=1, time=300)
        driver_cfg = dict(n_layer=2, n_embd=768, n_head=12, vocab=50257, time=1024)
        fused_cfg = dict(n_layer=1, n_embd=256, n_head=4, vocab=50257, batch=4, time=1024)

    if args.quick:
        completion_cfg = dict(n_layer=2, n_embd=64, n_head=2, vocab=5000, chunks=4, prefix=50,
                              continuation=20, batch_size=24)
    elif cuda:
        completion_cfg = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, chunks=20, prefix=50,
                              continuation=100, batch_size=120)
    else:
        completion_cfg = dict(n_layer=4, n_embd=256, n_head=4, vocab=50257, chunks=16, prefix=50,
                              continuation=100, batch_size=96)

    if args.quick:
        singletoken_cfg = dict(n_layer=2, n_embd=64, n_head=2, vocab=5000, chunks=3, time=128)
    elif cuda:
        singletoken_cfg = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, chunks=20, time=1024)
    else:
        singletoken_cfg = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, chunks=2, time=1024)

    results = {
        "machine": machine_description(device),
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "reps": reps,
    }
    if "loss" in only:
        results["loss"] = bench_losses(loss_shapes, device, reps)
    if "train" in only:
        results["train_step"] = [bench_train_step(train_cfg, device, reps)]
    if "driver" in only:
        results["driver_step"] = [bench_driver_step(driver_cfg, device, reps)]
    if "fused" in only:
        results["fused_memory"] = [bench_fused_memory(fused_cfg, device)]
    if "completion" in only:
        results["completion"] = [bench_completion(completion_cfg, device, max(1, reps // 2))]
    if "singletoken" in only:
        results["singletoken"] = [bench_singletoken(singletoken_cfg, device, max(1, reps // 2))]

    out_dir = ROOT / "benchmarks" / "results"
    if args.name:
        name = args.name
    elif args.quick:
        name = "quick"
    elif cuda:
        import re
        name = "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    else:
        name = "cpu"
    write_results(results, out_dir, name, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
