"""Contrastive search (scalegrad.generation.contrastive_search), batched vs one prefix
at a time (as SimCTG's own implementation runs), tokens per second, outputs checked
identical.

    python benchmarks/contrastive_search.py                 # the CPU; results in benchmarks/results/
    python benchmarks/contrastive_search.py --device cuda   # a GPU
    python benchmarks/contrastive_search.py --quick         # a smoke run

A random GPT-2 (the shape is in the table) continues P prefixes of different lengths
(padded, one batch) by C tokens with --penalty-alpha 0.6 and --top-k 5, the settings of
the papers. The two ways are timed in turn, repetition after repetition (interleaved, so
that a load from other processes on a shared machine falls on both); the table gives
the median tokens per second of each and the ratio of the medians, with the ratio of
each repetition beside it. The floor (issue 17): batched >= 5x one at a time at 96
prefixes on the CPU, with identical outputs.

Writes ``benchmarks/results/<name>.json`` and ``.md`` (``--name`` defaults to
``contrastive-search-<device kind>``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run import gpt2_model, sync, write_results  # noqa: E402  (benchmarks/run.py)

from scalegrad.generation import contrastive_search  # noqa: E402

ALPHA, TOP_K = 0.6, 5
FLOOR = 5.0


def padded_prefixes(num, shortest, longest, vocab, seed=0):
    """``num`` prefixes of lengths spread over [shortest, longest], right-padded."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (num,), generator=generator)
    ids = torch.randint(0, vocab, (num, longest), generator=generator)
    mask = torch.arange(longest)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask.long(), lengths.tolist()


def run_case(model, cfg, device, reps):
    ids, mask, lengths = padded_prefixes(cfg["prefixes"], cfg["shortest"], cfg["longest"], cfg["vocab"])
    ids, mask = ids.to(device), mask.to(device)
    length = cfg["continuation"]

    def batched():
        return contrastive_search(model, ids, length, penalty_alpha=ALPHA, top_k=TOP_K,
                                  attention_mask=mask)

    def one_at_a_time():
        return torch.cat([contrastive_search(model, ids[i:i + 1, :n], length, penalty_alpha=ALPHA,
                                             top_k=TOP_K) for i, n in enumerate(lengths)])

    first_batched, first_single = batched(), one_at_a_time()  # warm-up, and the outputs compared
    identical = torch.equal(first_batched, first_single)
    differing = int((first_batched != first_single).any(dim=1).sum())
    times = {"batched": [], "one at a time": []}
    for _ in range(reps):  # interleaved
        for name, fn in (("batched", batched), ("one at a time", one_at_a_time)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    tokens = cfg["prefixes"] * length
    median = {name: statistics.median(values) for name, values in times.items()}
    row = {
        "description": (f"{cfg['n_layer']}L/{cfg['n_embd']}d, V={cfg['vocab']}, {cfg['prefixes']} "
                        f"prefixes of {cfg['shortest']}-{cfg['longest']} + {length}, K={TOP_K}, "
                        f"alpha={ALPHA}"),
        "config": cfg, "reps": reps, "tokens": tokens, "seconds": times,
        "tokens_per_second": {name: tokens / value for name, value in median.items()},
        "speedup": median["one at a time"] / median["batched"],
        "speedup_per_rep": [s / b for b, s in zip(times["batched"], times["one at a time"])],
        "identical_outputs": identical, "rows_differing": differing,
    }
    print(f"[contrastive] {row['description']}: batched {row['tokens_per_second']['batched']:.0f} "
          f"tok/s, one at a time {row['tokens_per_second']['one at a time']:.0f} tok/s, "
          f"x{row['speedup']:.2f}, identical: {identical}", flush=True)
    return row


def render(results):
    lines = [f"Machine: {results['machine']}. Command: `{results['command']}`.", "",
             f"Repetitions interleaved (batched, one at a time, batched, ...); medians. Load "
             f"average (1 min) before the run: {results.get('load_before', 'not recorded')}, "
             f"after: {results.get('load_after', 'not recorded')}.", "",
             "| model and prefixes | batched tok/s | one at a time tok/s | batched vs one at a time "
             "| per repetition | identical outputs |", "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        per_rep = ", ".join(f"{r:.2f}" for r in row["speedup_per_rep"])
        lines.append(f"| {row['description']} | {row['tokens_per_second']['batched']:.0f} | "
                     f"{row['tokens_per_second']['one at a time']:.0f} | {row['speedup']:.2f}x | "
                     f"{per_rep} | {row['identical_outputs']} |")
    if results.get("floor") is not None:
        lines += ["", f"Floor: >= {FLOOR}x at 96 prefixes on the CPU with identical outputs: "
                      f"{'met' if results['floor'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def _load():
    """The 1-minute load average (a busy machine makes the ratio noisy), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own)")
    parser.add_argument("--prefixes", type=int, nargs="+", default=[96])
    parser.add_argument("--continuation", type=int, default=32)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (1 if args.quick else 3)
    if args.quick:
        cases = [dict(n_layer=2, n_embd=64, n_head=2, vocab=1000, prefixes=8, shortest=4,
                      longest=12, continuation=8)]
    else:
        model_cfg = dict(n_layer=4, n_embd=256, n_head=4, vocab=50257)
        cases = [dict(model_cfg, prefixes=p, shortest=16, longest=48,
                      continuation=args.continuation) for p in args.prefixes]
    load_before = _load()
    rows = []
    models = {}
    with torch.inference_mode():
        for cfg in cases:
            key = (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"])
            if key not in models:
                models[key] = gpt2_model(*key, n_positions=cfg["longest"] + cfg["continuation"],
                                         device=device).eval()
            rows.append(run_case(models[key], cfg, device, reps))
    floor = None
    if device.type == "cpu" and not args.quick:
        at_96 = [row for row in rows if row["config"]["prefixes"] == 96]
        floor = all(row["speedup"] >= FLOOR and row["identical_outputs"] for row in at_96)
    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch "
               f"{torch.__version__}, device {device}")
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(device)})"
    command = "python benchmarks/contrastive_search.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"machine": machine, "command": command.strip(), "rows": rows, "floor": floor,
               "load_before": load_before, "load_after": _load()}
    name = args.name or f"contrastive-search-{device.type}{'-quick' if args.quick else ''}"
    write_results(results, ROOT / "benchmarks" / "results", name, render)
    return 0 if floor is not False else 1


if __name__ == "__main__":
    sys.exit(main())
