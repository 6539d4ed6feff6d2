"""`monim demo`: a shortened run against the shared server, and the errors a user can make."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "monim.workers.cli", "demo", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_quick_demo_writes_the_table_json_and_plot(server_address, tmp_path):
    done = run_cli("--quick", "--seeds", "2", "--no-progress", "--address", server_address, "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "seed 1, day 1 (day1-email)" in done.stdout
    assert "summary after 1 new day(s) (mean ± std over seeds 0, 1)" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["store"]["shards"] == 2
    for arm in ("frozen", "knnlm", "monim", "monim_fixed_values", "finetune"):
        assert f"  {arm} " in done.stdout.split("summary after")[1]
        record = results["arms"][arm]
        assert len(record["new_day_ppl"]) == 2 and len(record["day0_ppl"]) == 2 and len(record["ppl_by_day"]) == 2
        assert len(record["new_day_ppl_std"]) == 2 and len(record["per_seed"]["new_day_ppl"]) == 2
        assert all(p > 1 for p in record["new_day_ppl"])
        assert set(results["summary"][arm]) == {"new_day_ppl", "day0_ppl", "new_day_vs_frozen", "day0_change"}
    assert results["memory"]["knnlm"]["rows"][1] > results["memory"]["knnlm"]["rows"][0] > 0
    assert results["memory"]["monim_fixed_values"]["rows"] == results["memory"]["monim"]["rows"]
    assert (tmp_path / "perplexity.png").stat().st_size > 10_000


def assert_one_line_error(done, fragment):
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("monim demo:")]
    assert len(lines) == 1 and fragment in lines[0], done.stderr


def test_missing_corpus(tmp_path):
    assert_one_line_error(run_cli("--corpus", str(tmp_path / "absent")), "no such folder")


def test_empty_corpus(tmp_path):
    assert_one_line_error(run_cli("--corpus", str(tmp_path)), "needs at least two day folders")


def test_day_folder_without_text(tmp_path):
    for day in ("day0", "day1"):
        (tmp_path / day).mkdir()
    (tmp_path / "day0" / "a.txt").write_text("words " * 1000)
    (tmp_path / "day1" / "image.png").write_bytes(b"\x89PNG")
    assert_one_line_error(run_cli("--corpus", str(tmp_path)), "day folder 'day1' has 0 characters of text")


def test_model_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "intermediate_size": 64, "vocab_size": 100}))
    assert_one_line_error(run_cli("--model", str(tmp_path)), "not a local Hugging Face causal LM")


def test_seeds_below_one(tmp_path):
    assert_one_line_error(run_cli("--quick", "--seeds", "0", "--out", str(tmp_path)), "--seeds must be at least 1")


def test_missing_model(tmp_path):
    assert_one_line_error(run_cli("--model", str(tmp_path / "absent")), "no such file or folder")


def test_store_that_does_not_answer():
    assert_one_line_error(run_cli("--quick", "--address", "127.0.0.1:9"), "(store 127.0.0.1:9)")


def test_threads_below_zero(tmp_path):
    assert_one_line_error(run_cli("--quick", "--threads", "-1", "--out", str(tmp_path)), "--threads must be at least 0")
