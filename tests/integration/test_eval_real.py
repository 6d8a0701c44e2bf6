"""`coe eval` end to end with the real packaged experts and datasets: in-process through the engine,
then against a real `coe serve` (--url), with that server also acting as the MT-Bench judge."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SUITES = "mmlu_stem,boolq,gsm8k,humaneval,mbpp,ifeval,bfcl"


def coe(*args: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coe", *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, two_expert_config):
    folder = tmp_path_factory.mktemp("eval-local")
    args = ["eval", "--config", str(two_expert_config), "--suite", SUITES, "--limit", "2",
            "--out", str(folder / "report"), "--cache", str(folder / "cache")]
    first = coe(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    return folder, args, first


def test_eval_writes_the_report_on_real_experts(local_run):
    folder, _, result = local_run
    report = json.loads((folder / "report" / "report.json").read_text())
    assert set(report["experts"]) == {"smollm2-135m", "gemma3-270m"}
    for cat in ("stem", "extraction", "math", "code", "writing", "tool_use"):
        for expert in report["experts"]:
            cell = report["table"][cat][expert]
            assert 0.0 <= cell["score"] <= 1.0 and cell["n"] >= 2
    kinds = {p["kind"] for p in report["points"]}
    assert kinds == {"single", "baseline", "coe"}
    oracle = next(p for p in report["points"] if p["name"] == "per-item oracle")
    assert all(oracle["score"] >= p["score"] - 1e-9 for p in report["points"] if p["kind"] == "single")
    assert (folder / "report" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "per-item oracle" in result.stdout and "mtbench" not in report["suites"]


def test_a_rerun_is_served_from_the_cache(local_run):
    _, args, _ = local_run
    again = coe(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " 0 results computed" in again.stdout


def test_the_measured_scores_feed_the_map(local_run, two_expert_config):
    folder, _, _ = local_run
    result = coe("router", "map", "--config", str(two_expert_config), "--scores",
                 str(folder / "report" / "scores.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "measured by `coe eval" in result.stdout and "Pareto frontier" in result.stdout


def test_eval_against_a_server_with_a_judge(smollm_server, tmp_path, two_expert_config):
    result = coe("eval", "--config", str(two_expert_config), "--url", smollm_server.base_url,
                 "--suite", "mmlu_stem,gsm8k,mtbench", "--limit", "2", "--choice-mode", "letter",
                 "--judge", smollm_server.base_url, "--judge-model", "smollm2-135m",
                 "--out", str(tmp_path / "report"), "--cache", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["run"]["target"] == smollm_server.base_url and not report["skipped"]
    assert report["suites"]["mtbench"] == 2
    rows = [json.loads(line) for f in (tmp_path / "cache").glob("*.jsonl") for line in f.read_text().splitlines()]
    judged = [r for r in rows if r["suite"] == "mtbench"]
    assert len(judged) == 4 and all(r["mode"] == "judge" for r in judged)
    assert all(r["mode"] == "generate" for r in rows if r["suite"] == "mmlu_stem")


def test_eval_against_a_coe_server_scores_multiple_choice_by_its_logprobs(smollm_server, tmp_path,
                                                                          two_expert_config):
    result = coe("eval", "--config", str(two_expert_config), "--url", smollm_server.base_url,
                 "--suite", "mmlu_stem", "--limit", "3", "--experts", "smollm2-135m",
                 "--out", str(tmp_path / "report"), "--cache", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for f in (tmp_path / "cache").glob("*.jsonl")
            for line in f.read_text().splitlines()]
    assert len(rows) == 3 and all(r["mode"] == "logprob" for r in rows)


def test_bad_arguments_name_the_field(two_expert_config, tmp_path):
    result = coe("eval", "--config", str(two_expert_config), "--suite", "nope", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown suite 'nope'" in result.stderr and "Traceback" not in result.stderr
    result = coe("eval", "--config", str(two_expert_config), "--experts", "ghost", "--suite", "boolq",
                 "--out", str(tmp_path))
    assert result.returncode == 2 and "--experts" in result.stderr and "Traceback" not in result.stderr
