"""One training step of a Llama with a 128k vocabulary: apply_scalegrad vs the ScaleGradLoss
hook vs the model's own cross-entropy (fp32, CPU). See docs/large-vocabularies.md.

    python benchmarks/large_vocab.py            # the three shapes, results in benchmarks/results/
    python benchmarks/large_vocab.py --quick    # small shapes (a smoke run)

Paths, on the same weights and tokens:

- ``model_ce``: ``model(input_ids, labels=...)`` unpatched, the model's own cross-entropy;
- ``hook``: ``ScaleGradLoss(0.2)(model(input_ids), labels)``, the trainer's ``compute_loss_func``;
- ``patched``: ``apply_scalegrad(model, 0.2)`` then ``model(input_ids, labels=...)``.

A step is forward, backward and an SGD update. Extra peak memory: the peak resident set a
fresh process adds during one step (after a warm-up step, gradients freed), one process per
path and shape (run.py's measurement). Time: the median of ``--reps`` steps per path, the
paths interleaved (patched, hook, model_ce, patched, ...) in one process, so that load from
other processes on a shared machine falls on all three alike. Ratios are taken in one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import _proc_status_kb, write_results  # noqa: E402  (benchmarks/run.py)
from scalegrad import ScaleGradLoss, apply_scalegrad, remove_scalegrad  # noqa: E402

PATHS = ("patched", "hook", "model_ce")
SHAPES = {  # name: (layers, width, intermediate, heads, kv heads, tied, vocab, batch, time)
    "tiny-2048": (2, 64, 256, 4, 2, False, 128256, 1, 2048),
    "tiny-4096": (2, 64, 256, 4, 2, False, 128256, 1, 4096),
    # Llama-3.2-1B's width, heads and tied 128k embedding, two layers.
    "wide-1024": (2, 2048, 8192, 32, 8, True, 128256, 1, 1024),
}
QUICK = {
    "tiny-256": (2, 64, 256, 4, 2, False, 32000, 1, 256),
    "wide-128": (1, 256, 512, 4, 2, True, 32000, 1, 128),
}
GAMMA = 0.2
CHUNK_SIZE = 256


def build(shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, width, intermediate, heads, kv_heads, tied, vocab, batch, time_ = shape
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=time_, tie_word_embeddings=tied, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    generator = torch.Generator().manual_seed(1)
    # Natural-text-like repetition: ids drawn from the few thousand most frequent.
    input_ids = torch.randint(0, min(vocab, 5000), (batch, time_), generator=generator)
    return model, input_ids


def step_fn(model, input_ids, path):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    hook = ScaleGradLoss(GAMMA)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if path == "hook":
            loss = hook(model(input_ids=input_ids), input_ids)
        else:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, optimizer


def set_path(model, path):
    """Patch the model for ``patched``, unpatch it for the other paths."""
    from scalegrad.hf_patch import fused_patch_settings

    patched = fused_patch_settings(model) is not None
    if path == "patched" and not patched:
        apply_scalegrad(model, GAMMA, chunk_size=CHUNK_SIZE, check=False)
    elif path != "patched" and patched:
        remove_scalegrad(model)


def memory_child(name, path, shapes):
    """Prints the peak bytes one step of ``path`` adds over the resident set before it."""
    model, input_ids = build(shapes[name])
    set_path(model, path)
    step, optimizer = step_fn(model, input_ids, path)
    step()  # warm-up
    optimizer.zero_grad(set_to_none=True)
    before = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss = step()
    print(loss)
    print((_proc_status_kb("VmHWM") - before) * 1024)


def measure_memory(name, path, quick, threads):
    cmd = [sys.executable, __file__, "--memory-child", name, "--path", path, *(["--quick"] if quick else []),
           *(["--threads", str(threads)] if threads else [])]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed blocks go back to the system
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()
    return int(lines[-1]), float(lines[-2])


def measure_time(name, shape, reps):
    model, input_ids = build(shape)
    apply_scalegrad(model, GAMMA, chunk_size=CHUNK_SIZE)  # checks the head once
    remove_scalegrad(model)
    times = {path: [] for path in PATHS}
    losses = {}
    steps = {}
    for path in PATHS:  # a warm-up step each
        set_path(model, path)
        steps[path] = step_fn(model, input_ids, path)[0]
        losses[path] = steps[path]()
    for _ in range(reps):
        for path in PATHS:
            set_path(model, path)
            start = time.perf_counter()
            steps[path]()
            times[path].append(time.perf_counter() - start)
    set_path(model, "model_ce")
    return {path: statistics.median(values) for path, values in times.items()}, times, losses


def markdown(results):
    lines = [f"Machine: {results['machine']}. Command: `{results['command']}`.", "",
             "One training step (forward, backward, SGD), fp32, CPU. Extra peak memory: resident set, one "
             "process per path and shape. Time: median of interleaved repetitions in one process "
             f"({results['reps']} per path; the machine was shared with other jobs).", "",
             "| shape | path | extra peak memory | step time | loss | memory vs hook | time vs hook |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for path in PATHS:
            lines.append(
                f"| {row['description']} | {path} | {row['memory'][path] / 2**30:.2f} GB | "
                f"{row['time'][path]:.2f} s | {row['loss'][path]:.4f} | "
                f"{row['memory'][path] / row['memory']['hook']:.3f}x | "
                f"{row['time'][path] / row['time']['hook']:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per path (interleaved)")
    parser.add_argument("--only", default=None, help="comma list of shape names")
    parser.add_argument("--name", default=None, help="results file name (default: large_vocab_cpu)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own; also passed to the memory processes)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else SHAPES
    if args.memory_child:
        memory_child(args.memory_child, args.path, shapes)
        return 0
    names = args.only.split(",") if args.only else list(shapes)
    rows = []
    for name in names:
        shape = shapes[name]
        layers, width, _, _, _, tied, vocab, batch, time_ = shape
        memory, losses = {}, {}
        for path in PATHS:
            memory[path], losses[path] = measure_memory(name, path, args.quick, args.threads)
            print(f"{name} {path}: extra peak {memory[path] / 2**30:.3f} GB", flush=True)
        medians, all_times, _ = measure_time(name, shape, args.reps)
        print(f"{name}: {medians}", flush=True)
        rows.append({"name": name, "description": f"{layers}L/{width}d{' tied' if tied else ''}, "
                                                  f"{batch}x{time_}, V={vocab}",
                     "memory": memory, "time": medians, "times": all_times, "loss": losses})
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "command": "python benchmarks/large_vocab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "reps": args.reps, "chunk_size": CHUNK_SIZE, "gamma": GAMMA, "rows": rows,
    }
    write_results(results, Path(args.out_dir), args.name or ("large_vocab_quick" if args.quick else "large_vocab_cpu"),
                  markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
