"""Profiles: experts that run on another expert's weights and add a system prompt, few-shot
messages, sampling defaults or an adapter. Config validation, what the base model sees, the
sampling defaults a request leaves unset, one cache slot and one queue per base."""

from __future__ import annotations

import textwrap

import pytest

from coe.cache import ModelCache
from coe.cache.tiers import Budgets
from coe.config import CoEConfig, ExpertConfig, ServerConfig, from_dict, from_yaml
from coe.engine.batch import prompt_of
from coe.engine.scheduler import Scheduler
from coe.errors import ConfigError
from coe.models import ModelStore
from coe.server.openai import with_expert_defaults
from coe.server.protocol import ChatCompletionRequest
from coe.types import ChatMessage, Profile, Request

from test_cache_manager import FakeBackend, folders  # noqa: F401 (fixture)


def config_of(*profiles: dict, base_source: str = "smollm2-135m") -> CoEConfig:
    return from_dict({"experts": [{"name": "base", "source": base_source}, *profiles]})


def test_a_profile_takes_its_base_weights_and_adds_what_it_says():
    config = config_of({
        "name": "poet", "base": "base", "system_prompt": "Answer in verse.",
        "few_shot": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, friend"}],
        "sampling": {"temperature": 0.2, "max_tokens": 40, "stop": "END"},
    })
    poet = config.expert("poet")
    assert (poet.source, poet.backend, poet.params) == ("smollm2-135m", "auto", {})
    assert config.runs_on("poet") == "base" and config.runs_on("base") == "base"
    assert poet.profile == Profile("poet", "Answer in verse.",
                                   (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello, friend")))
    assert config.expert("base").profile is None


@pytest.mark.parametrize("profile, field, words", [
    ({"base": "nobody"}, "experts[1].base", "no expert named 'nobody'"),
    ({"base": "poet2"}, "experts[1].base", "itself a profile"),
    ({"base": "base", "source": "gemma3-270m"}, "experts[1].source", "runs on its base's weights"),
    ({"base": "base", "params": {"n_ctx": 10}}, "experts[1].params", "set params on the base"),
    ({"base": "base", "few_shot": [{"role": "robot", "content": "x"}]}, "experts[1].few_shot[0]", "role"),
    ({"base": "base", "sampling": {"top_k": 3}}, "experts[1].sampling.top_k", "unknown field"),
    ({"base": "base", "sampling": {"temperature": "hot"}}, "experts[1].sampling.temperature", "a number"),
    ({"base": "base", "sampling": {"temperature": 9}}, "experts[1].sampling.temperature", "[0, 2]"),
    ({"base": "base", "sampling": {"stop": [1]}}, "experts[1].sampling.stop", "list of strings"),
    ({"adapter": "x.gguf", "source": "smollm2-135m"}, "experts[1].adapter", "needs a base expert"),
    ({"base": "base", "adapter_scale": "big"}, "experts[1].adapter_scale", "a number"),
])
def test_a_bad_profile_fails_naming_the_field(tmp_path, profile, field, words):
    experts = [{"name": "base", "source": "smollm2-135m"}, {"name": "poet", **profile},
               {"name": "poet2", "base": "base"}]
    path = tmp_path / "coe.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"experts": experts}))
    with pytest.raises(ConfigError) as info:
        from_yaml(path)
    assert info.value.param == field and words in info.value.message and str(path) in info.value.message


def test_a_profile_of_a_remote_expert_is_refused():
    with pytest.raises(ConfigError, match="not a local model"):
        from_dict({"experts": [{"name": "far", "source": "http://x/v1", "backend": "remote",
                                "params": {"num_params": "7B"}},
                               {"name": "p", "base": "far"}]})


def test_the_conversation_the_base_sees():
    profile = Profile("p", "Be brief.", (ChatMessage("user", "Q"), ChatMessage("assistant", "A")))
    ask = (ChatMessage("user", "Why?"),)
    assert profile.messages(ask) == (ChatMessage("system", "Be brief."), ChatMessage("user", "Q"),
                                     ChatMessage("assistant", "A"), ChatMessage("user", "Why?"))
    own = (ChatMessage("system", "Be long."), *ask)  # the request's own system message wins
    assert profile.messages(own)[0] == ChatMessage("system", "Be long.") and len(profile.messages(own)) == 4
    assert profile.prompt("Once upon") == "Be brief.\n\nQ\n\nA\n\nOnce upon"
    assert Profile("p").messages(ask) == ask and Profile("p").prompt("x") == "x"


def test_prompt_of_renders_the_profile_first():
    from fakes import LetterVocab

    vocab = LetterVocab()
    profile = Profile("p", "SYSTEM-TEXT")
    plain = Request("base", messages=(ChatMessage("user", "hello"),))
    with_profile = Request("p", messages=(ChatMessage("user", "hello"),), profile=profile)
    assert "SYSTEM-TEXT" not in prompt_of(vocab, plain)[0]
    assert prompt_of(vocab, with_profile)[0].index("SYSTEM-TEXT") < prompt_of(vocab, with_profile)[0].index("hello")


def test_sampling_defaults_fill_only_what_the_request_left_unset():
    from coe.server.openai import sampling_of

    limits = ServerConfig(max_tokens_limit=100)
    defaults = ExpertConfig("p", base="b", sampling={"temperature": 0.1, "max_tokens": 500, "stop": ["END"],
                                                     "seed": 7}).sampling_defaults()
    body = ChatCompletionRequest.model_validate(
        {"model": "p", "messages": [{"role": "user", "content": "x"}], "temperature": 0.9})
    sampling = with_expert_defaults(sampling_of(body, None, limits), body, defaults, limits)
    assert (sampling.temperature, sampling.max_tokens, sampling.stop, sampling.seed) == (0.9, 100, ("END",), 7)
    body = ChatCompletionRequest.model_validate(
        {"model": "p", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5})
    assert with_expert_defaults(sampling_of(body, 5, limits), body, defaults, limits).max_tokens == 5


def test_profiles_share_their_base_queue_and_batches():
    scheduler = Scheduler(max_batch_size=8)
    for expert in ("a", "b", "c"):
        scheduler.add(Request(expert, prompt="x", runs_on="base"))
    scheduler.add(Request("other", prompt="x"))
    assert scheduler.queued_by_expert() == {"base": 3, "other": 1}
    batch = scheduler.next_batch(0.0, resident=["base"])
    assert batch.expert == "base" and [r.expert for r in batch.requests] == ["a", "b", "c"]


def test_profiles_share_one_cache_slot(folders):  # noqa: F811
    backend = FakeBackend()
    experts = (ExpertConfig("a", str(folders["a"]), backend="torch_hf"),
               ExpertConfig("p", base="a", system_prompt="x"), ExpertConfig("q", base="a"),
               ExpertConfig("b", str(folders["b"]), backend="torch_hf"))
    cache = ModelCache(CoEConfig(experts=experts), ModelStore("unused"), backends={"torch_hf": backend},
                       budgets=Budgets(device_bytes=10**9, host_bytes=10**9, device_kind="cpu"))
    with cache.lease("p") as runner:
        assert runner is cache.activate("q") is cache.activate("a")
    assert backend.reads["a"] == 1 and backend.materializes["a"] == 1 and cache.stats.switches == 0
    assert sorted(cache.hot_experts()) == ["a", "p", "q"]
    states = {s.name: s for s in cache.states()}
    assert states["p"].base == "a" and states["p"].tier == states["a"].tier
    assert states["p"].host_bytes == 0 and states["a"].host_bytes > 0
    assert states["p"].num_params == states["a"].num_params
    cache.evict("q")  # a profile's name moves its base
    assert cache.tier_of("a") == cache.tier_of("p") != "device"


def test_a_request_waits_in_its_base_queue_unless_its_adapter_applies_per_batch(tmp_path):
    from coe.engine.routing import _queue_of

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    config = from_dict({"experts": [
        {"name": "torch-base", "source": str(tmp_path / "ckpt")},
        {"name": "gguf-base", "source": str(tmp_path / "model.gguf")},
        {"name": "torch-lora", "base": "torch-base", "adapter": "a"},
        {"name": "gguf-lora", "base": "gguf-base", "adapter": "b.gguf"},
        {"name": "gguf-prompt", "base": "gguf-base", "system_prompt": "x"},
    ]})
    queues = {e.name: _queue_of(e) for e in config.experts}
    assert queues == {"torch-base": "torch-base", "gguf-base": "gguf-base",
                      "torch-lora": "torch-base",  # per-row LoRA: batched with its base
                      "gguf-lora": "gguf-lora",  # llama.cpp: one adapter per batch
                      "gguf-prompt": "gguf-base"}
