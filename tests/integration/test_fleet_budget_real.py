"""A fleet larger than its budgets on a real server: 12 distinct copies of the packaged SmolLM2 GGUF
(so the page cache cannot share them) behind a host budget for 3 of them and 2 hot at once. After
every request each tier's accounted bytes are within its budget, and an expert evicted under that
pressure answers exactly as it did before (greedy, one request at a time)."""

from __future__ import annotations

import shutil

import httpx
import pytest

from conftest import running

from coe.cli import coe_home
from coe.models.catalog import ModelStore

pytestmark = pytest.mark.integration

EXPERTS = 12


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    original = ModelStore(coe_home()).ensure("smollm2-135m")
    root = tmp_path_factory.mktemp("fleet")
    files = []
    for n in range(EXPERTS):
        files.append(root / f"smol-{n}.gguf")
        shutil.copyfile(original, files[-1])
    size = original.stat().st_size
    config = (
        "experts:\n"
        + "".join(f"  - name: smol-{n}\n    source: {path}\n" for n, path in enumerate(files))
        + "router:\n  enabled: false\n"
        + f"cache:\n  host_bytes: {3 * size + size // 2}\n  max_hot_experts: 2\n"
    )
    with running(root / "server", config) as server:
        yield server, size


def answer(base_url: str, model: str) -> str:
    reply = httpx.post(base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a colour of the sky."}]})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_a_fleet_beyond_its_budgets_stays_within_them_and_evicted_experts_answer_the_same(fleet):
    server, size = fleet
    first: dict[str, str] = {}
    for rounds in range(2):
        for n in range(EXPERTS):
            name = f"smol-{n}"
            text = answer(server.base_url, name)
            if rounds == 0:
                first[name] = text
            else:
                assert text == first[name], name  # back from disk, the same weights, the same answer
            shape = httpx.get(server.base_url + "/v1/experts", timeout=10).json()
            for tier, room in shape["tiers"].items():
                if room["budget_bytes"]:
                    assert room["used_bytes"] <= room["budget_bytes"], (tier, name, room)
            hot = [e["name"] for e in shape["experts"] if e["tier"] == "device"]
            assert len(hot) <= 2 and name in hot
            warm = [e for e in shape["experts"] if e["tier"] in ("device", "host")]
            assert len(warm) <= 3
    assert len(set(first.values())) == 1  # twelve copies of one model agree
    evictions = shape["stats"]["evictions"]
    assert sum(evictions.values()) >= EXPERTS  # every request of the second round reloaded one
