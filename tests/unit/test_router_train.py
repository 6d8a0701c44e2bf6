"""coe.router.train: calibration, threshold, evaluation and a whole training run on synthetic prompts
with a fake sentence encoder (no real weights)."""
import hashlib
import math
from dataclasses import replace

import pytest
import torch

from coe.errors import ConfigError
from coe.router.data import Example, split_of
from coe.router.encoder import ENCODER_DIST, ENCODER_IMPL, ENCODER_VERSION
from coe.router.head import Features, Head, load_head, ngram_bag
from coe.router.learned import LearnedRouter
from coe.router.train import (EmbeddingStore, Evaluation, TrainSettings, data_version, evaluate, fit_head,
                              fit_temperature, fit_threshold, format_evaluation, is_current,
                              train_router)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


KEYWORDS = {
    "math": ("equation", "integral", "algebra", "derivative"),
    "code": ("python", "function", "compiler", "bug"),
    "writing": ("poem", "story", "essay", "letter"),
}
FILLER = ("please", "help", "me", "with", "this", "quickly", "today", "thanks", "the", "a")


class FakeEncoder:
    """Deterministic 8-d embeddings: a one-hot for the category keyword found, plus hashed noise."""

    max_tokens = 16
    precision = "float32"
    dim = 8
    tuned_layers = 0

    def __init__(self):
        self.encoded: list[str] = []

    def _encode_uncached(self, texts):
        self.encoded.extend(texts)
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for k, words in enumerate(KEYWORDS.values()):
                if any(w in text for w in words):
                    out[i, k] = 1.0
            seed = int(hashlib.blake2b(text.encode(), digest_size=4).hexdigest(), 16)
            noise = torch.randn(self.dim - 3, generator=torch.Generator().manual_seed(seed))
            out[i, 3:] = 0.3 * noise
        return out

    encode = _encode_uncached  # what LearnedRouter calls


def synthetic(n=210, prefix="syn") -> list[Example]:
    examples = []
    cats = list(KEYWORDS)
    for i in range(n):
        cat = cats[i % 3]
        keyword = KEYWORDS[cat][(i // 3) % 4]
        filler = " ".join(FILLER[(i * 7 + j) % len(FILLER)] for j in range(4))
        group = f"{prefix}:{i}"
        examples.append(Example(f"{filler} {keyword} number {i}", cat, "synthetic", group,
                                split_of(group, False)))
    return examples


SETTINGS = TrainSettings()


@pytest.fixture(scope="module")
def trained():
    examples = synthetic()
    heldout = [Example(f"my {w} here", cat, "mtbench", f"mt:{cat}:{w}", "heldout")
               for cat, words in KEYWORDS.items() for w in words]
    heldout.append(Example("tell me a joke", "humour", "mtbench", "mt:x", "heldout"))  # not trained
    encoder = FakeEncoder()
    result = train_router(examples, heldout, encoder, None, SETTINGS)
    return examples, heldout, encoder, result


# -- calibration ----------------------------------------------------------------------------------
def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(2000, 5, generator=g)
    true_t = 2.5
    y = torch.multinomial(torch.softmax(logits / true_t, -1), 1, generator=g).squeeze(1)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.15)
    sharper = torch.multinomial(torch.softmax(logits / 0.5, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, sharper) == pytest.approx(0.5, rel=0.15)


def test_fit_temperature_stays_on_its_grid():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    assert fit_temperature(logits, torch.tensor([0, 1])) == pytest.approx(0.05, rel=1e-3)
    assert fit_temperature(logits, torch.tensor([1, 0])) == pytest.approx(20.0, rel=1e-3)


def test_fit_threshold_is_zero_when_everything_is_right():
    confidence = torch.linspace(0.05, 1.0, 100)
    assert fit_threshold(confidence, torch.ones(100, dtype=torch.bool), 0.5) == 0.0


def test_fit_threshold_finds_where_low_confidence_stops_being_mostly_wrong():
    confidence = (torch.arange(200) + 0.5) / 200
    correct = confidence >= 0.3
    # below t > 0.3 the accuracy is (t - 0.3) / t: < 0.5 up to t = 0.55, exactly 0.5 at 0.6
    assert fit_threshold(confidence, correct, 0.5) == 0.55
    assert fit_threshold(confidence, correct, 0.25) == 0.35  # (t-0.3)/t < 0.25 -> t < 0.4


def test_fit_threshold_needs_enough_prompts_below():
    confidence = torch.cat([torch.full((10,), 0.1), torch.full((200,), 0.99)])
    correct = torch.cat([torch.zeros(10, dtype=torch.bool), torch.ones(200, dtype=torch.bool)])
    assert fit_threshold(confidence, correct, 0.5) == 0.0  # only 10 below: not trusted
    assert fit_threshold(confidence, correct, 0.5, min_count=5) == 0.95


# -- evaluation -----------------------------------------------------------------------------------
CATS = ("math", "code", "chat")
PROBS = torch.tensor([[0.75, 0.125, 0.125],   # math, right
                      [0.375, 0.25, 0.375],   # code predicted math (low confidence)
                      [0.125, 0.75, 0.125],   # code, right
                      [0.25, 0.25, 0.5]])     # chat, right (low, but it is the fallback)
Y = torch.tensor([0, 1, 1, 2])


def test_evaluate_confusion_and_accuracy():
    ev = evaluate("test", PROBS, Y, CATS, 0.6, "chat")
    assert ev.name == "test" and ev.n == 4 and ev.categories == CATS
    assert ev.confusion == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert ev.accuracy == 0.75
    assert ev.fallback_rate == 0.25  # the chat prediction is not counted as a fallback
    assert ev.per_category() == {"math": {"precision": 0.5, "recall": 1.0, "n": 1},
                                 "code": {"precision": 1.0, "recall": 0.5, "n": 2},
                                 "chat": {"precision": 1.0, "recall": 1.0, "n": 1}}


def test_evaluate_fallback_outside_the_categories_counts_every_low_confidence():
    assert evaluate("t", PROBS, Y, CATS, 0.6, "other").fallback_rate == 0.5
    assert evaluate("t", PROBS, Y, CATS, 0.0, "other").fallback_rate == 0.0


def test_evaluate_empty():
    ev = evaluate("none", torch.empty(0, 3), torch.empty(0, dtype=torch.long), CATS, 0.5, "chat")
    assert (ev.n, ev.accuracy, ev.fallback_rate) == (0, 0.0, 0.0)
    assert ev.confusion == [[0] * 3] * 3
    assert ev.per_category()["math"] == {"precision": 0.0, "recall": 0.0, "n": 0}


def test_evaluation_to_dict_and_format():
    ev = evaluate("test", PROBS, Y, CATS, 0.6, "chat")
    d = ev.to_dict()
    assert d["n"] == 4 and d["accuracy"] == 0.75 and d["confusion"] == ev.confusion
    assert d["per_category"]["code"]["recall"] == 0.5
    text = format_evaluation(ev)
    lines = text.splitlines()
    assert lines[0] == ("test: accuracy 75.0% on 4 prompts (below the confidence threshold, "
                        "25.0% would go to the fallback)")
    assert "  code              1.00    0.50     2" in lines
    assert lines[-3:] == ["  math            1     0     0", "  code            1     1     0",
                          "  chat            0     0     1"]


def test_format_evaluation_skips_categories_without_prompts():
    ev = Evaluation("v", 1, 1.0, 0.0, ("math", "code"), [[1, 0], [0, 0]])
    text = format_evaluation(ev)
    assert "  math " in text and "  code " not in text


# -- embeddings cache -----------------------------------------------------------------------------
def test_embedding_store_caches_on_disk(tmp_path):
    encoder = FakeEncoder()
    store = EmbeddingStore(encoder, tmp_path)
    assert store.path.name == f"embeddings-{ENCODER_DIST}-{ENCODER_VERSION}-16-float32-impl{ENCODER_IMPL}.pt"
    first = store.embed(["a poem", "a bug", "a poem"])
    assert first.shape == (3, 8)
    assert torch.equal(first[0], first[2])
    assert sorted(encoder.encoded) == ["a bug", "a poem"]  # each distinct text once
    assert store.path.is_file()

    again = FakeEncoder()
    rows = EmbeddingStore(again, tmp_path).embed(["a bug", "an essay"])
    assert again.encoded == ["an essay"]
    assert torch.equal(rows[0], first[1])


def test_embedding_store_rebuilds_a_damaged_cache(tmp_path):
    store = EmbeddingStore(FakeEncoder(), tmp_path)
    store.path.write_bytes(b"not a torch file")
    encoder = FakeEncoder()
    rows = EmbeddingStore(encoder, tmp_path).embed(["x"])
    assert encoder.encoded == ["x"] and rows.shape == (1, 8)


def test_embedding_store_without_a_folder_and_with_no_texts():
    store = EmbeddingStore(FakeEncoder(), None)
    assert store.path is None
    assert store.embed([]).shape == (0, 8)


# -- a whole run ----------------------------------------------------------------------------------
def test_train_router_learns_the_synthetic_categories(trained):
    examples, heldout, encoder, result = trained
    meta = result.head.meta
    assert meta.categories == ("math", "code", "writing")  # taxonomy order
    assert meta.dim == 8 and meta.hidden_size == 0
    assert meta.encoder == {"dist": ENCODER_DIST, "version": ENCODER_VERSION, "max_tokens": 16,
                            "precision": "float32", "impl": ENCODER_IMPL, "tuned_layers": 0}
    sizes = {s: sum(e.split == s for e in examples) for s in ("train", "val", "test")}
    assert min(sizes.values()) >= 10
    assert meta.data == {**sizes, "heldout": len(heldout), "sources": ["synthetic"]}
    assert set(result.evaluations) == {"val", "test", "mtbench"}
    test = result.evaluations["test"]
    assert test.n == sizes["test"]
    assert test.accuracy > 0.9
    assert result.evaluations["mtbench"].n == len(heldout) - 1  # the untrained category is skipped
    assert 0.05 * (1 - 1e-6) <= meta.temperature <= 20 * (1 + 1e-6)  # the float32 grid
    assert 0.0 <= meta.threshold <= 0.95
    assert meta.metrics["test"]["accuracy"] == test.accuracy
    assert set(meta.metrics) == {"val", "test", "mtbench"}
    assert result.seconds > 0
    # every text was embedded exactly once
    assert sorted(encoder.encoded) == sorted({e.text for e in [*examples, *heldout]})


def test_trained_head_saves_and_loads_back_with_the_same_probabilities(trained, tmp_path):
    examples, _, _, result = trained
    result.head.save(tmp_path)
    loaded = load_head(tmp_path)
    assert loaded.meta == result.head.meta
    texts = [e.text for e in examples[:20]]
    f = Features(FakeEncoder()._encode_uncached(texts), [ngram_bag(t) for t in texts])
    assert torch.equal(loaded.probabilities(f), result.head.probabilities(f))


def test_temperature_and_threshold_are_fitted_on_validation(trained):
    examples, _, _, result = trained
    val = [e for e in examples if e.split == "val"]
    texts = [e.text for e in val]
    f = Features(FakeEncoder()._encode_uncached(texts), [ngram_bag(t) for t in texts])
    y = torch.tensor([result.head.meta.categories.index(e.category) for e in val])
    with torch.inference_mode():
        logits = result.head.net(f)
    assert result.head.meta.temperature == fit_temperature(logits, y)
    conf, pred = torch.softmax(logits / result.head.meta.temperature, -1).max(-1)
    assert result.head.meta.threshold == fit_threshold(conf, pred == y, SETTINGS.min_fallback_accuracy)


def test_trained_router_routes_new_prompts(trained, tmp_path):
    result = trained[3]
    result.head.save(tmp_path)
    router = LearnedRouter.load(tmp_path, "chat", threshold=0.0, encoder=FakeEncoder())
    decisions = router.classify(["could you solve this equation", "my python function crashes",
                                 "write a short poem about rain"])
    assert [d.category for d in decisions] == ["math", "code", "writing"]


def test_format_evaluation_of_a_trained_run(trained):
    ev = trained[3].evaluations["test"]
    text = format_evaluation(ev)
    assert text.startswith(f"test: accuracy {ev.accuracy:.1%} on {ev.n} prompts")


def test_train_router_is_reproducible_with_the_same_seed():
    examples = synthetic(60, prefix="rep")
    settings = TrainSettings(epochs=2, batch_size=32, seed=3)
    a = train_router(examples, [], FakeEncoder(), None, settings)
    b = train_router(examples, [], FakeEncoder(), None, settings)
    sa, sb = a.head.net.state_dict(), b.head.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.head.meta == b.head.meta
    assert "mtbench" not in a.evaluations


def test_train_router_uses_the_embedding_cache(tmp_path):
    examples = synthetic(60, prefix="cache")
    settings = TrainSettings(epochs=1)
    train_router(examples, [], FakeEncoder(), tmp_path, settings)
    encoder = FakeEncoder()
    train_router(examples, [], encoder, tmp_path, settings)
    assert encoder.encoded == []


def test_train_router_needs_two_categories():
    examples = [e for e in synthetic(60) if e.category == "math"]
    with pytest.raises(ConfigError, match="at least two categories"):
        train_router(examples, [], FakeEncoder(), None, TrainSettings(epochs=1))


@pytest.mark.parametrize("missing", ["train", "val"])
def test_train_router_needs_train_and_val_splits(missing):
    examples = [e for e in synthetic(60) if e.split != missing]
    with pytest.raises(ConfigError, match=f"the {missing} split is empty"):
        train_router(examples, [], FakeEncoder(), None, TrainSettings(epochs=1))


def test_train_router_reports_progress():
    seen = []
    train_router(synthetic(60, prefix="prog"), [], FakeEncoder(), None, TrainSettings(epochs=3, min_steps=0),
                 progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert ("embed", 60, 60) in seen
    assert [s for s in seen if s[0] == "train"] == [("train", 1, 3), ("train", 2, 3), ("train", 3, 3)]


def test_probabilities_are_calibrated_rows(trained):
    examples, _, _, result = trained
    texts = [e.text for e in examples[:9]]
    probs = result.head.probabilities(Features(FakeEncoder()._encode_uncached(texts),
                                               [ngram_bag(t) for t in texts]))
    assert probs.sum(-1).tolist() == pytest.approx([1.0] * 9, abs=1e-5)
    assert all(not math.isnan(p) for p in probs.flatten().tolist())


# -- data versions ----------------------------------------------------------------------------------
def test_data_version_is_a_stable_short_hash():
    version = data_version()
    assert version == data_version()
    assert len(version) == 12 and int(version, 16) >= 0


def test_is_current_only_for_an_artifact_of_this_data_version(trained, tmp_path):
    result = trained[3]
    assert not is_current(tmp_path / "nothing")
    head = Head(result.head.net, replace(result.head.meta, data={**result.head.meta.data}))
    head.save(tmp_path)
    assert not is_current(tmp_path)  # trained without a version (as train_router leaves it)
    head.meta.data["version"] = data_version()
    head.save(tmp_path)
    assert is_current(tmp_path)
    head.meta.data["version"] = "user:mine.jsonl"
    head.save(tmp_path)
    assert not is_current(tmp_path)
    (tmp_path / "router.json").write_text("{broken")
    assert not is_current(tmp_path)


# -- chat-style prompts: weighted in training, calibrated on ----------------------------------------
def test_fit_head_follows_the_heavier_of_two_contradicting_labels():
    """The same prompt labelled both ways: the weighted label wins, whichever it is (no validation
    prompts, so the last epoch is kept)."""
    x = Features(torch.eye(2).repeat(20, 1), [([], [])] * 40)
    y = torch.tensor([0, 1] * 20)
    twin = torch.tensor([1, 0] * 20)  # the same features with the other label
    feats = Features(torch.cat([x.embeddings, x.embeddings]), x.ngrams * 2)
    labels = torch.cat([y, twin])
    for heavy, expected in ((0, y[:2]), (1, twin[:2])):
        weights = torch.ones(80)
        weights[heavy * 40:(heavy + 1) * 40] = 5.0
        none = Features(torch.empty(0, 2), [])
        net = fit_head(feats, labels, none, torch.empty(0, dtype=torch.long), 2,
                       TrainSettings(epochs=200, min_steps=0, lr=2e-2), None, weights)
        with torch.inference_mode():
            assert net(x.select([0, 1])).argmax(-1).tolist() == expected.tolist()


def _calibration_examples(chat_val: int) -> list[Example]:
    """Synthetic prompts whose benchmark validation is full of keyword-less (unsure, mostly wrong)
    prompts, plus ``chat_val`` clean chat-style validation prompts."""
    examples = [e for e in synthetic(240, prefix="cal") if e.split != "val"]
    cats = list(KEYWORDS)
    examples += [Example(f"{FILLER[i % 10]} {FILLER[(i * 3) % 10]} item {i}", cats[i % 3], "synthetic",
                         f"vague:{i}", "val") for i in range(60)]
    examples += [Example(f"hey {KEYWORDS[cats[i % 3]][i % 4]} {i} thanks", cats[i % 3], "chat",
                         f"chat:{i}", "val") for i in range(chat_val)]
    return examples


def test_threshold_is_calibrated_on_chat_style_validation_when_there_is_enough():
    settings = TrainSettings(epochs=5)
    on_all = train_router(_calibration_examples(19), [], FakeEncoder(), None, settings).head.meta
    on_chat = train_router(_calibration_examples(40), [], FakeEncoder(), None, settings).head.meta
    assert on_all.threshold > 0  # 19 chat prompts are too few: the vague benchmark ones decide
    assert on_chat.threshold == 0  # the chat-style prompts are right however unsure


def test_heldout_sets_are_reported_by_source(trained):
    examples, heldout, encoder, _ = trained
    more = [Example(f"my {w} there", cat, "chat_test", f"ct:{cat}:{w}", "heldout")
            for cat, words in KEYWORDS.items() for w in words]
    result = train_router(examples, heldout + more, encoder, None, TrainSettings(epochs=2))
    assert list(result.evaluations) == ["val", "test", "mtbench", "chat_test"]
    assert result.evaluations["chat_test"].n == len(more)
