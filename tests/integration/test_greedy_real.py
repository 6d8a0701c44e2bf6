"""Greedy outputs of every default expert through the engine: the same as a plain llama.cpp loop
on the same context (argmax of the last logits, one token at a time: no coe decoder, slots,
sampler or batch), and the same as coe produced before the decode-loop redesign
(``tests/data/greedy_golden.json``, recorded with one llama.cpp build and CPU variant; kernels
round differently elsewhere, so that comparison runs where the fingerprint matches)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from coe.backends.chat import PLAIN_STOP
from coe.config import default_config
from coe.engine import Engine
from coe.engine.batch import prompt_of
from coe.types import ChatMessage, Request, SamplingParams

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).parent.parent / "data" / "greedy_golden.json"
MAX_TOKENS = 40


def request(expert: str, kind: str, text: str) -> Request:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    if kind == "chat":
        return Request(expert, sampling, messages=(ChatMessage("user", text),))
    return Request(expert, sampling, prompt=text)


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def engine(coe_home):
    pytest.importorskip("llama_cpp")
    config = default_config()
    engine = Engine.from_config(config, coe_home)
    for expert in config.experts:
        if engine.cache.state_of(expert.name).availability == "not installed":
            pytest.skip(f"packaged model {expert.source} is not installed (make setup)")
    yield engine
    engine.stop()


def through_engine(engine, req: Request) -> str:
    final = [e for e in engine.stream(req) if e.is_final][-1]
    assert final.error is None, final.error
    return final.completion.text


def plain_loop(runner, req: Request) -> str:
    """llama.cpp driven directly on the runner's context: prefill, then argmax one token at a time."""
    import numpy as np
    from llama_cpp import _internals

    lib = runner.lib
    text, implied_stop = prompt_of(runner.vocab, req)
    ids = runner.vocab.encode(text)
    runner.forget_all()
    batch = _internals.LlamaBatch(n_tokens=max(len(ids), 1), embd=0, n_seq_max=1, verbose=False)
    out = b""
    try:
        batch.set_batch(ids, n_past=0, logits_all=False)
        position = len(ids)
        for _ in range(MAX_TOKENS):
            assert lib.llama_decode(runner.ctx.ctx, batch.batch) == 0
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(runner.ctx.ctx, -1), shape=(runner.n_vocab,))
            token = int(np.argmax(logits))
            if runner.vocab.is_end(token):
                break
            out += runner.vocab.token_bytes(token)
            batch.set_batch([token], n_past=position, logits_all=False)
            position += 1
    finally:
        batch.close()
        runner.forget_all()
    decoded = out.decode("utf-8", errors="replace")
    for stop in (*req.sampling.stop, *implied_stop):
        decoded = decoded.split(stop)[0]
    return decoded


def test_the_engine_decodes_exactly_what_a_plain_llama_cpp_loop_does(engine, golden):
    for expert, rows in golden["outputs"].items():
        for row in rows:
            coe_text = through_engine(engine, request(expert, row["kind"], row["prompt"]))
            with engine.cache.lease(expert) as runner:
                assert coe_text == plain_loop(runner, request(expert, row["kind"], row["prompt"])), (expert, row["prompt"])


def test_greedy_outputs_are_those_coe_gave_before_the_redesign(engine, golden):
    from coe.backends.llama_lib import cpu_backend

    recorded = golden["recorded_with"]
    import llama_cpp

    here = {"llama_cpp_python": llama_cpp.__version__, "cpu_variant": cpu_backend().variant}
    if any(recorded[key] != value for key, value in here.items()):
        pytest.skip(f"recorded with {recorded}; this machine runs {here} (other kernels round differently)")
    for expert, rows in golden["outputs"].items():
        got = [through_engine(engine, request(expert, row["kind"], row["prompt"])) for row in rows]
        assert got == [row["text"] for row in rows], expert
