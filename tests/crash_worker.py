"""A fault-injection worker for tests/test_crash_consistency.py: kills real runs of
``run_gpt2.py`` at every file-system step of one write, then runs them again.

    python tests/crash_worker.py PLAN.json

``PLAN.json``: ``{"root": DIR, "argv": [...], "targets": [[NAME, WRITER, OCCURRENCE,
RERUN_FLAGS(, ARGV)], ...]}``, where ``argv`` (or a target's own ``ARGV``) is a command
line of ``run_gpt2.py`` without ``--output-dir``. The driver is imported once; every run is a child process made with
``os.fork`` (a real process, as a subprocess of the command line, but without its
start-up of several seconds), its output in ``ROOT/NAME/WHEN-K`` and its log beside.

For each target, the child's ``OCCURRENCE``-th call of ``WRITER`` (a writer of the
driver: ``resume``, ``best``, ``result`` or ``eval-result``) has every
``os.replace`` / ``os.rename`` / ``os.link`` / ``shutil.copy*`` / ``shutil.move`` call it
makes counted, and the child ends with ``os._exit(137)`` just before call 1, then
just after call K for K = 1, 2, ... until a child finishes without reaching K (so
every step is covered). After each kill a second child runs ``argv + RERUN_FLAGS``
(``--resume`` for training) with nothing patched. ``ROOT/reference`` (``ROOT/reference-NAME`` for a
target with its own ``ARGV``) is one run with nothing patched and never killed. ``ROOT/result.json`` lists every run: its exit
statuses, and the file-system calls of the uninterrupted patched run.
"""

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# As tests/conftest.py: one thread (the float sums, so the weights, depend on it).
torch.set_num_threads(int(os.environ.get("SCALEGRAD_TEST_THREADS", "1")))

from scalegrad.gpt2 import checkpoint, driver, trainer  # noqa: E402
from scalegrad.gpt2.run_gpt2 import main  # noqa: E402

KILLED = 137
MAX_STEPS = 200
FILE_SYSTEM_CALLS = [(os, "replace"), (os, "rename"), (os, "link"), (shutil, "copy"),
                     (shutil, "copy2"), (shutil, "copyfile"), (shutil, "copytree"),
                     (shutil, "move")]
WRITERS = {"resume": (checkpoint, "save_resume_checkpoint"), "best": (checkpoint, "save_best"),
           "result": (trainer, "write_singletoken_result"),
           "eval-result": (driver, "write_singletoken_result")}


def arm(writer: str, occurrence: int, when: str, k: int, record: list) -> None:
    """In this process: exit with status 137 before (``when="before"``) or after file-system
    call ``k`` of the ``occurrence``-th call of ``writer``; every counted call goes to ``record``."""
    state = {"calls": 0, "armed": False, "count": 0, "inside": 0}
    module, name = WRITERS[writer]
    real_writer = getattr(module, name)

    def counted_writer(*args, **kwargs):
        state["calls"] += 1
        state["armed"] = state["calls"] == occurrence
        try:
            return real_writer(*args, **kwargs)
        finally:
            state["armed"] = False

    setattr(module, name, counted_writer)
    for owner, function in FILE_SYSTEM_CALLS:
        def wrapper(*args, _real=getattr(owner, function), _name=function, **kwargs):
            if not state["armed"] or state["inside"]:  # copy2 calls copyfile: count it once
                return _real(*args, **kwargs)
            state["count"] += 1
            record.append([_name] + [os.path.basename(os.fspath(a)) for a in args[:2]])
            if when == "before" and state["count"] == k:
                os._exit(KILLED)
            state["inside"] += 1
            try:
                result = _real(*args, **kwargs)
            finally:
                state["inside"] -= 1
            if when == "after" and state["count"] == k:
                os._exit(KILLED)
            return result
        setattr(owner, function, wrapper)


def in_child(out: Path, argv: list, arm_with: tuple | None = None) -> tuple[int, list]:
    """Run ``main(argv + --output-dir out)`` in a forked child; its exit status and the
    file-system calls it counted (when it finished)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    calls_file = out.parent / f"{out.name}.calls.json"
    log = out.parent / f"{out.name}.log"
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            record: list = []
            if arm_with is not None:
                arm(*arm_with, record)
            status = main(list(argv) + ["--output-dir", str(out)])
            calls_file.write_text(json.dumps(record))
        except BaseException as exc:  # noqa: BLE001 - report anything, never return to the parent's code
            print(f"child failed: {exc!r}", file=sys.stderr)
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, code = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(code)
    calls = json.loads(calls_file.read_text()) if calls_file.is_file() else []
    return status, calls


def crashed_state(out: Path) -> dict:
    """What a reader finds in ``out`` after a crash: the newest complete copy of
    ``resume/`` (its step) and ``best/`` (its result files), and the result files."""
    from scalegrad.io import complete_copy

    state = {"tree": sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []}
    resume = complete_copy(out / checkpoint.RESUME_DIR)
    if resume is not None:
        loaded = torch.load(resume / checkpoint.STATE_FILE, map_location="cpu", weights_only=True)
        state["resume_steps"] = loaded["progress"]["total_steps"]
        state["resume_has_model"] = (resume / "model.safetensors").is_file()
    best = complete_copy(out / checkpoint.BEST_DIR)
    state["best_results"] = sorted(p.name for p in best.glob("singletoken__*.json")) if best else None
    state["results"] = sorted(p.name for p in out.glob("singletoken__*.json"))
    return state


def warm_up(argv: list) -> None:
    """Import (lazily imported) transformers classes and read the model and tokenizer once,
    so each child starts training at once; nothing is computed."""
    from scalegrad.gpt2 import tracking  # noqa: F401
    from scalegrad.gpt2.options import parse_args
    from scalegrad.gpt2.runtime import load_model, load_tokenizer_for, model_source

    args = parse_args(list(argv) + ["--output-dir", "unused"])
    load_model(model_source(args))
    load_tokenizer_for(args)


def run_plan(plan: dict) -> dict:
    root = Path(plan["root"])
    warm_up(plan["argv"])
    result = {"reference": {}, "targets": {}}
    for name, writer, occurrence, rerun_flags, *own_argv in plan["targets"]:
        argv = own_argv[0] if own_argv else plan["argv"]
        reference = "reference" if not own_argv else f"reference-{name}"
        if reference not in result["reference"]:
            result["reference"][reference] = in_child(root / reference, argv)[0]
        runs, calls = [], None
        points = [("before", 1)] + [("after", k) for k in range(1, MAX_STEPS + 1)]
        for when, k in points:
            out = root / name / f"{when}-{k}"
            status, recorded = in_child(out, argv, (writer, occurrence, when, k))
            if status == 0:  # finished: the write has fewer than k steps
                calls = recorded
                shutil.rmtree(out, ignore_errors=True)
                break
            crashed = crashed_state(out)
            rerun = in_child(out, argv + rerun_flags)[0]
            runs.append({"out": str(out), "when": when, "k": k, "status": status,
                         "rerun_status": rerun, "crashed": crashed})
        result["targets"][name] = {"runs": runs, "calls": calls}
    return result


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text())
    outcome = run_plan(plan)
    (Path(plan["root"]) / "result.json").write_text(json.dumps(outcome, indent=1))
