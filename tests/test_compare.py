"""``scalegrad-compare`` (docs/compare.md): the shortened comparison (configs/compare_ci.yaml)
end to end, its table checked against the per-run result files; stages skipped when done,
a removed stage redone alone, --force redoing every stage; bad configs are one error line,
exit 2 and nothing written."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scalegrad.gpt2 import compare

ROOT = Path(__file__).resolve().parent.parent
CI_CONFIG = ROOT / "configs" / "compare_ci.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def run_compare(*args, timeout=1500):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # 13 short run_gpt2.py stages of a tiny model
def test_compare_end_to_end_table_skip_resume_force(tmp_path):
    out = tmp_path / "compare"
    proc = run_compare("--config", CI_CONFIG, "--output-dir", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = yaml.safe_load(CI_CONFIG.read_text())
    objectives, decodings = list(config["objectives"]), list(config["decodings"])

    with open(out / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["decoding"]) for r in table] == \
        [(o, d) for o in objectives for d in decodings] + [("human", "-")]
    # Every number in the table is the one in the per-run result files.
    for row in table[:-1]:
        singletoken = json.loads(next((out / "eval" / row["run"] / "singletoken").glob("singletoken__*.json"))
                                 .read_text())["metrics"]
        completion = json.loads(next((out / "eval" / row["run"] / row["decoding"]).glob("completion__*.json"))
                                .read_text())
        assert row["ppl"] == f"{singletoken['ppl']:.3f}"
        assert row["acc"] == f"{singletoken['hits_at_1']:.3f}"
        if "sample_statistics" in completion:  # several samples: their mean
            seq_rep_4 = completion["sample_statistics"]["mean"]["bpe_test/pct_repeat_4grams"]
            assert row["diversity std"] != ""
        else:
            seq_rep_4 = completion["bpe_metrics"]["bpe_test/pct_repeat_4grams"]
        assert float(row["seq-rep-4"]) == pytest.approx(seq_rep_4, abs=5e-4)
        assert float(row["diversity"]) == pytest.approx(completion["text_metrics"]["metrics"]["diversity"],
                                                        abs=5e-4)
    # Each objective trained from the model its config names, with its own objective.
    assert json.loads((out / "train" / "UL-seq" / "config.json").read_text())
    for name in ("seq_rep_vs_ppl.png", "diversity_vs_ppl.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert (out / "comparison.md").read_text().startswith("| run | model | decoding | seq-rep-4 |")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds"]["stages (all runs)"]) >= {f"train {o}" for o in objectives}

    # A second run finds every stage done; a removed result redoes that stage alone.
    for path in (out / "eval" / "SG-0.2" / "top-p").iterdir():
        path.unlink()
    again = run_compare("--config", CI_CONFIG, "--output-dir", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in again.stdout.splitlines() if line.startswith("=== ")] == \
        ["=== decode SG-0.2 top-p"]

    # --force redoes every stage (the subprocesses recorded here, not run).
    forced = compare.Comparison(compare.load_config(CI_CONFIG), out, force=True)
    ran = []
    forced._run = lambda stage, argv: (ran.append(stage), forced.timings.__setitem__(stage, 0.0))
    forced.run()
    assert ran == ["prepare data", *forced.plan]


def bad(tmp_path, edit, capsys):
    config = yaml.safe_load(CI_CONFIG.read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    status = compare.main(["--config", str(path), "--output-dir", str(out)])
    return status, capsys.readouterr().err, out


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["objectives"].update(X={"kind": "dpo"}), "objective 'X': unknown kind 'dpo'"),
    (lambda c: c["decodings"].update(beam={"kind": "beam"}), "decoding 'beam': unknown kind 'beam'"),
    (lambda c: c.update(extra={}), "unknown section(s) ['extra']"),
    (lambda c: c["objectives"]["UL-seq"].pop("start_from"), "needs start_from"),
    (lambda c: c["objectives"].update(SG={"kind": "scalegrad"}), "of kind scalegrad needs gamma"),
    (lambda c: c["objectives"].update(SG={"kind": "scalegrad", "gamma": 0}), "objective SG: --gamma"),
    (lambda c: c["objectives"].update(SG={"kind": "scalegrad", "gamma": 0.5, "no_such_flag": 1}),
     "unrecognized arguments: --no-such-flag"),
    (lambda c: c["decodings"].update(cs={"kind": "contrastive", "penalty_alpha": 1.5, "top_k": 4}),
     "decoding cs:"),
    (lambda c: c["objectives"].update({"a b": {"kind": "mle"}}), "a name is letters"),
])
def test_bad_config_is_one_error_line_and_writes_nothing(tmp_path, edit, message, capsys):
    status, err, out = bad(tmp_path, edit, capsys)
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert not out.exists()


def test_the_shakespeare_corpus_is_the_plays_as_plain_paragraphs():
    from scalegrad import data

    text = data.shakespeare_corpus_text()
    assert text == data.CORPORA["shakespeare"]()  # the same text on every call
    assert 4_500_000 < len(text) < 5_500_000
    paragraphs = text.split("\n\n")
    assert "HAMLET: To be, or not to be: that is the question:" in text
    assert paragraphs[0] == "A Midsummer Night's Dream"
    assert not any(mark in text for mark in ("**", "\n#", "# ACT"))
    speeches = [p for p in paragraphs if p.split(":")[0].isupper() and ":" in p]
    assert len(speeches) > 25_000
