"""The torch-side benchmarks run end to end on small real checkpoints and write the JSON fields
their issues name (the full runs are `make bench`; these keep the commands from rotting)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "coe", "bench", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_load_compares_the_backend_with_raw_copies(tmp_path):
    result = _bench(tmp_path, "load", "--shape", "tiny", "--device", "cpu", "--repeats", "1")
    steps = {row["step"]: row for row in result["rows"]}
    assert set(steps) == {"disk->host (read)", "host->device (materialize)"}
    assert all(row["coe_s"] > 0 and row["baseline_s"] > 0 for row in steps.values())


def test_bench_switch_on_synthetic_experts_writes_every_field(tmp_path):
    result = _bench(tmp_path, "switch", "--no-packaged", "--synthetic", "2", "--largest", "0.12e9",
                    "--device", "cpu", "--requests", "200", "--seeds", "1", "--workdir", str(tmp_path))
    assert result["memcpy_gbps"] > 0 and result["disk_gbps"] > 0 and result["h2d_gbps"] is None
    names = [row["name"] for row in result["experts"]]
    assert names == ["syn-0.10b-llama", "syn-0.12b-qwen2"]
    for row in result["experts"]:
        assert row["weight_bytes"] > 0.1e9
        for key in ("naive_s", "warm_to_hot_s", "cold_to_hot_s", "hot_ttft_s"):
            assert row[key] > 0, key
        assert row["warm_to_hot_s"] < row["cold_to_hot_s"]  # host memory beats the disk
    replay = result["replay"]
    assert replay["lru_switch_s"] > 0 and replay["policy_switch_s"] > 0
    assert [p for p in ("lru", "gdsf", "lrfu") if p in replay] == ["lru", "gdsf", "lrfu"]


def test_bench_prefix_reuses_the_first_turn_on_a_packaged_expert(tmp_path, coe_home):
    from coe.models import ModelStore

    pytest.importorskip("llama_cpp")
    if ModelStore(coe_home).status("smollm2-135m") == "not installed":
        pytest.skip("packaged model smollm2-135m is not installed (make setup)")
    result = _bench(tmp_path, "prefix", "--experts", "smollm2-135m", "--conversations", "2", "--max-tokens", "4")
    row = result["experts"][0]
    assert row["off"]["second_turn"]["cached_tokens_mean"] == 0
    on = row["on"]["second_turn"]
    assert row["on"]["first_turn"]["prompt_tokens_mean"] <= on["cached_tokens_mean"] < on["prompt_tokens_mean"]
    assert row["second_turn_speedup"] > 0


def test_bench_overhead_isolated_compares_a_worker_with_in_process(tmp_path, coe_home):
    from coe.models import ModelStore

    pytest.importorskip("llama_cpp")
    if ModelStore(coe_home).status("smollm2-135m") == "not installed":
        pytest.skip("packaged model smollm2-135m is not installed (make setup)")
    result = _bench(tmp_path, "overhead", "--isolated", "--experts", "smollm2-135m", "--repeats", "2",
                    "--max-tokens", "8")
    row = result["rows"][0]
    assert len(row["coe"]["runs_s"]) == len(row["isolated"]["runs_s"]) == 2
    assert row["isolated"]["tokens"] == row["coe"]["tokens"] > 0  # greedy: the same completion
    assert row["isolated_tok_s_ratio"] > 0 and row["isolated_ttft_ratio"] > 0


def test_bench_shared_writes_a_row_per_n_with_both_forms(tmp_path, coe_home):
    result = _bench(tmp_path, "shared", "--n", "2", "--requests", "6", "--rate", "6",
                    "--max-tokens-median", "4", "--workdir", str(tmp_path / "work"))
    (row,) = result["rows"]
    assert row["n"] == 2
    for form in ("shared", "separate"):
        assert row[form]["lost"] == 0 and row[form]["rss_bytes"] > 0
        assert row[form]["throughput_rps"] > 0 and row[form]["ttft_p99_s"] > 0
    assert row["shared"]["switches"] == 0
    assert not (tmp_path / "work" / "copies").exists()  # the copies are deleted at the end


def test_bench_scale_times_startup_and_per_request_work(tmp_path, coe_home):
    result = _bench(tmp_path, "scale", "--experts", "2,4", "--repeats", "1", "--requests", "100",
                    "--workdir", str(tmp_path / "work"))
    small, large = result["rows"]
    assert (small["experts"], large["experts"]) == (2, 4)
    for row in (small, large):
        assert row["startup_s"] > 0 and row["router_us"] > 0 and row["scheduler_us"] > 0
        assert row["policy_us"] > 0 and row["victims_per_miss_us"] > 0
    assert large["apparent_bytes"] > small["apparent_bytes"]
    assert set(result["ratio_4_vs_2"]) >= {"startup_s", "total_us"}
    assert not (tmp_path / "work" / "fleet").exists()  # the sparse files are deleted


def test_bench_lora_compares_per_row_adapters_with_one_batch_per_adapter(tmp_path):
    result = _bench(tmp_path, "lora", "--shape", "tiny", "--adapters", "3", "--steps", "2",
                    "--repeats", "1")
    assert set(result["tokens_per_s"]) == {"base_one_batch", "per_row_one_batch", "batch_per_adapter"}
    assert all(value > 0 for value in result["tokens_per_s"].values())
    assert result["per_row_vs_batch_per_adapter_x"] > 0


def test_bench_fleet_replays_one_trace_against_coe_naive_and_the_ideal(tmp_path, coe_home):
    work = tmp_path / "work"
    result = _bench(tmp_path, "fleet", "--experts", "4", "--disk-ratio", "0", "--models",
                    "smollm2-135m", "--requests", "6", "--rate", "6", "--max-tokens-median", "4",
                    "--only", "coe", "--only", "naive", "--only", "ideal", "--workdir", str(work))
    assert result["experts"] == 4 and result["disk_bytes"] > 0 and result["ram_bytes"] > 0
    assert result["budget_bytes"] == sum(result["budgets"].values())
    assert set(result["servers"]) == {"coe", "naive", "ideal"}
    for summary in result["servers"].values():
        assert summary["completed"] + summary["errors"] == 6 and summary["lost"] == 0
        assert summary["throughput_rps"] > 0 and summary["ttft_p99_s"] >= summary["ttft_p50_s"]
        assert summary["startup_s"] > 0 and summary["peak_rss_bytes"] > 0
    assert result["targets"]["naive"]["throughput_x"] > 0
    assert not (work / "experts").exists()  # the copies are deleted
    trace = [json.loads(line) for line in (work / "trace.jsonl").read_text().splitlines()]
    assert {item["model"] for item in trace} <= {f"smollm2-135m-{k}" for k in range(1, 5)}


def test_bench_fleet_refuses_without_the_disk_space_it_needs(tmp_path, coe_home):
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "coe", "bench", "fleet", "--disk-ratio", "1000",
                           "--only", "coe", "--workdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "GB under" in done.stderr and "is free" in done.stderr
    assert not out.exists()
