"""coe.router.head: hashed n-gram features, the head network and its artifact on disk; and the
LearnedRouter on top of it with a fake sentence encoder (no real weights)."""
import hashlib
import json
import math

import pytest
import torch

from coe.errors import RouterUnavailable
from coe.router.encoder import ENCODER_DIST, ENCODER_IMPL, ENCODER_VERSION
from coe.router.head import (FORMAT_VERSION, MAX_NGRAM_CHARS, META_FILE, NGRAM_BUCKETS, WEIGHTS_FILE,
                             Features, Head, HeadMeta, HeadNet, load_head, ngram_bag)
from coe.router.learned import LearnedRouter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


DIM = 8
CATS = ("math", "code", "writing")
ENCODER = {"dist": ENCODER_DIST, "version": ENCODER_VERSION, "max_tokens": 16, "precision": "float32",
           "impl": ENCODER_IMPL}


def bucket(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=4).digest(), "little") % NGRAM_BUCKETS


def make_head(seed=0, hidden=0, temperature=1.5, threshold=0.3) -> Head:
    torch.manual_seed(seed)
    net = HeadNet(DIM, hidden, len(CATS))
    with torch.no_grad():  # non-zero n-gram weights so the round trip covers them
        net.ngrams.weight.normal_()
    meta = HeadMeta(CATS, DIM, hidden, temperature, threshold, dict(ENCODER),
                    metrics={"test": {"accuracy": 0.9}}, data={"train": 10})
    return Head(net.eval(), meta)


def features(texts, seed=1) -> Features:
    g = torch.Generator().manual_seed(seed)
    return Features(torch.randn(len(texts), DIM, generator=g), [ngram_bag(t) for t in texts])


TEXTS = ["solve the equation for x", "write a python function", "a poem about the sea", ""]


# -- n-grams ----------------------------------------------------------------------------------------
def test_ngram_bag_counts_unigrams_and_bigrams_with_log_weights():
    ids, weights = ngram_bag("Cat cat dog")
    grams = {bucket("cat"): 1 + math.log(2), bucket("dog"): 1.0, bucket("cat cat"): 1.0,
             bucket("cat dog"): 1.0}
    norm = math.sqrt(sum(w * w for w in grams.values()))
    assert dict(zip(ids, weights)) == pytest.approx({k: v / norm for k, v in grams.items()})
    assert sum(w * w for w in weights) == pytest.approx(1.0)


def test_ngram_bag_is_case_insensitive_and_skips_digits_and_punctuation():
    assert ngram_bag("Hello, WORLD!") == ngram_bag("hello world")
    assert ngram_bag("12 345 ... !!") == ([], [])
    assert ngram_bag("") == ([], [])
    ids, _ = ngram_bag("don't stop")
    assert set(ids) == {bucket("don't"), bucket("stop"), bucket("don't stop")}


def test_ngram_bag_reads_only_the_first_chars():
    head = "a " * (MAX_NGRAM_CHARS // 2)
    assert ngram_bag(head + "zebra") == ngram_bag(head)
    assert ngram_bag("zebra " + head) != ngram_bag(head)


def test_ngram_bag_buckets_are_in_range_and_deterministic():
    ids, _ = ngram_bag("the quick brown fox jumps over the lazy dog " * 3)
    assert all(0 <= i < NGRAM_BUCKETS for i in ids)
    assert len(ids) == len(set(ids))
    assert ngram_bag("the quick brown fox") == ngram_bag("the quick brown fox")


def test_features_bag_and_select():
    f = features(["a b", "", "c"])
    ids, offsets, weights = f.bag()
    assert offsets.tolist() == [0, 3, 3]  # a, b, "a b" | nothing | c
    assert ids.dtype == torch.long and weights.dtype == torch.float32
    assert ids.tolist() == ngram_bag("a b")[0] + ngram_bag("c")[0]
    assert len(f) == 3
    picked = f.select([2, 0])
    assert len(picked) == 2
    assert torch.equal(picked.embeddings, f.embeddings[[2, 0]])
    assert picked.ngrams == [ngram_bag("c"), ngram_bag("a b")]


# -- the network --------------------------------------------------------------------------------------
def test_headnet_linear_and_mlp_shapes():
    linear = HeadNet(DIM, 0, 3)
    mlp = HeadNet(DIM, 16, 3)
    assert len(linear.net) == 1
    assert [type(m).__name__ for m in mlp.net] == ["Linear", "GELU", "Dropout", "Linear"]
    f = features(TEXTS)
    assert linear(f).shape == (4, 3)
    assert mlp.eval()(f).shape == (4, 3)
    assert linear.ngrams.weight.shape == (NGRAM_BUCKETS, 3)
    assert torch.count_nonzero(linear.ngrams.weight) == 0  # n-grams start neutral


def test_headnet_adds_the_ngram_term():
    net = HeadNet(DIM, 0, 3)
    f = features(["only this"])
    before = net(f)
    with torch.no_grad():
        net.ngrams.weight[bucket("only")] = torch.tensor([1.0, 2.0, 3.0])
    _, weights = ngram_bag("only this")
    delta = net(f) - before
    assert delta[0].tolist() == pytest.approx([w * weights[0] for w in (1.0, 2.0, 3.0)], abs=1e-6)


def test_head_probabilities_sum_to_one_and_temperature_flattens_them():
    head = make_head(temperature=1.0)
    f = features(TEXTS)
    probs = head.probabilities(f)
    assert probs.shape == (4, 3)
    assert probs.sum(-1).tolist() == pytest.approx([1.0] * 4)
    hot = Head(head.net, HeadMeta(CATS, DIM, 0, 10.0, 0.3, ENCODER)).probabilities(f)
    assert (hot.max(-1).values < probs.max(-1).values).all()
    assert torch.equal(hot.argmax(-1), probs.argmax(-1))


# -- the artifact -----------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [0, 16])
def test_save_and_load_round_trip(tmp_path, hidden):
    head = make_head(hidden=hidden)
    folder = head.save(tmp_path / "artifact")
    assert folder == tmp_path / "artifact"
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_FILE, META_FILE]  # no .tmp left
    loaded = load_head(folder)
    assert loaded.meta == head.meta
    assert not loaded.net.training
    f = features(TEXTS)
    assert torch.allclose(loaded.probabilities(f), head.probabilities(f), atol=0, rtol=0)


def test_meta_json_is_readable(tmp_path):
    make_head().save(tmp_path)
    raw = json.loads((tmp_path / META_FILE).read_text())
    assert raw["categories"] == list(CATS)
    assert raw["format_version"] == FORMAT_VERSION == 1
    assert raw["temperature"] == 1.5 and raw["threshold"] == 0.3
    assert raw["encoder"] == ENCODER


def test_save_overwrites_an_older_artifact(tmp_path):
    make_head(seed=0).save(tmp_path)
    newer = make_head(seed=5, temperature=2.0)
    newer.save(tmp_path)
    loaded = load_head(tmp_path)
    assert loaded.meta.temperature == 2.0
    f = features(TEXTS)
    assert torch.equal(loaded.probabilities(f), newer.probabilities(f))


def unavailable(folder) -> str:
    with pytest.raises(RouterUnavailable) as info:
        load_head(folder)
    assert info.value.http_status == 503
    return info.value.message


def saved(tmp_path) -> tuple:
    make_head().save(tmp_path)
    return tmp_path / META_FILE, tmp_path / WEIGHTS_FILE


def edit_meta(tmp_path, **changes):
    meta_path, _ = saved(tmp_path)
    raw = json.loads(meta_path.read_text())
    raw.update(changes)
    meta_path.write_text(json.dumps(raw))
    return meta_path


def test_missing_folder(tmp_path):
    message = unavailable(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / META_FILE) in message
    assert "coe router train" in message


def test_missing_weights(tmp_path):
    _, weights = saved(tmp_path)
    weights.unlink()
    message = unavailable(tmp_path)
    assert message.startswith(f"{weights}: the router's weights are missing")


def test_missing_metadata_with_weights_present(tmp_path):
    meta_path, _ = saved(tmp_path)
    meta_path.unlink()
    assert unavailable(tmp_path).startswith(f"{meta_path}: no trained router here")


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage"])
def test_corrupt_metadata(tmp_path, content):
    meta_path, _ = saved(tmp_path)
    meta_path.write_bytes(content)
    assert unavailable(tmp_path).startswith(f"{meta_path}: corrupt router metadata")


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version(tmp_path, version):
    meta_path = edit_meta(tmp_path, format_version=version)
    message = unavailable(tmp_path)
    assert message.startswith(f"{meta_path}: field 'format_version' must be 1")


def test_metadata_that_is_not_an_object(tmp_path):
    meta_path, _ = saved(tmp_path)
    meta_path.write_text("[1, 2]")
    assert unavailable(tmp_path).startswith(f"{meta_path}: field 'format_version'")


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "warm", None])
def test_bad_temperature(tmp_path, temperature):
    meta_path = edit_meta(tmp_path, temperature=temperature)
    message = unavailable(tmp_path)
    assert message.startswith(str(meta_path))
    assert "'temperature' must be a positive finite number" in message


@pytest.mark.parametrize("threshold", [-0.1, 1.5, "high", None])
def test_bad_threshold(tmp_path, threshold):
    meta_path = edit_meta(tmp_path, threshold=threshold)
    message = unavailable(tmp_path)
    assert message.startswith(str(meta_path))
    assert "'threshold' must be between 0 and 1" in message


@pytest.mark.parametrize("categories", [["math"], ["math", "math", "code"], []])
def test_bad_categories(tmp_path, categories):
    edit_meta(tmp_path, categories=categories)
    assert "'categories' must list at least two distinct names" in unavailable(tmp_path)


@pytest.mark.parametrize("field,value", [("dim", "8"), ("dim", 0), ("hidden_size", 1.5)])
def test_bad_sizes(tmp_path, field, value):
    edit_meta(tmp_path, **{field: value})
    assert "'dim' must be a positive integer and 'hidden_size' a non-negative one" in unavailable(tmp_path)


def test_several_problems_are_reported_together(tmp_path):
    edit_meta(tmp_path, temperature=0, threshold=2)
    message = unavailable(tmp_path)
    assert "'temperature'" in message and "'threshold'" in message


def test_missing_and_unexpected_fields(tmp_path):
    meta_path, _ = saved(tmp_path)
    raw = json.loads(meta_path.read_text())
    del raw["dim"]
    meta_path.write_text(json.dumps(raw))
    assert unavailable(tmp_path).startswith(f"{meta_path}: missing or unexpected field")
    raw["dim"], raw["colour"] = DIM, "blue"
    meta_path.write_text(json.dumps(raw))
    assert "colour" in unavailable(tmp_path)
    del raw["colour"], raw["categories"]
    meta_path.write_text(json.dumps(raw))
    assert unavailable(tmp_path).startswith(f"{meta_path}: missing or unexpected field")


def test_truncated_weights(tmp_path):
    _, weights = saved(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = unavailable(tmp_path)
    assert message.startswith(f"{weights}: the router's weights are corrupt")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_garbage_weights(tmp_path, content):
    _, weights = saved(tmp_path)
    weights.write_bytes(content)
    assert unavailable(tmp_path).startswith(f"{weights}: the router's weights are corrupt")


def test_weights_of_another_shape(tmp_path):
    edit_meta(tmp_path, dim=DIM * 2)  # metadata and weights disagree
    weights = tmp_path / WEIGHTS_FILE
    message = unavailable(tmp_path)
    assert message.startswith(f"{weights}: the router's weights are corrupt")
    assert "size mismatch" in message


def test_weights_with_missing_tensors(tmp_path):
    from safetensors.torch import save_file

    _, weights = saved(tmp_path)
    save_file({"net.0.weight": torch.zeros(3, DIM)}, str(weights))
    assert unavailable(tmp_path).startswith(f"{weights}: the router's weights are corrupt")


def test_negative_hidden_size_is_router_unavailable(tmp_path):
    meta_path = edit_meta(tmp_path, hidden_size=-1)
    assert unavailable(tmp_path).startswith(str(meta_path))


def test_infinite_temperature_is_rejected(tmp_path):
    edit_meta(tmp_path, temperature=float("inf"))
    assert "'temperature'" in unavailable(tmp_path)


# -- LearnedRouter with a fake encoder ----------------------------------------------------------------
class FakeEncoder:
    max_tokens, precision, dim = 16, "float32", DIM

    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs
        self.seen: list[str] = []

    def encode(self, texts):
        self.seen.extend(texts)
        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(int(hashlib.md5(t.encode()).hexdigest()[:8], 16))
            rows.append(torch.randn(DIM, generator=g))
        return torch.stack(rows)


def test_learned_router_probabilities_are_the_heads(tmp_path):
    head = make_head()
    encoder = FakeEncoder()
    router = LearnedRouter(encoder, head, "chat")
    texts = ["solve x", "write a poem"]
    rows = router.probabilities(texts)
    expected = head.probabilities(Features(FakeEncoder().encode(texts), [ngram_bag(t) for t in texts]))
    assert rows == expected.tolist()
    assert encoder.seen == texts
    assert router.categories == CATS
    assert router.threshold == 0.3  # the calibrated one
    assert LearnedRouter(encoder, head, "chat", threshold=0.0).threshold == 0.0


def test_learned_router_load_builds_the_encoder_the_head_was_trained_with(tmp_path, monkeypatch):
    import coe.router.learned as learned

    make_head().save(tmp_path)
    monkeypatch.setattr(learned, "SentenceEncoder", FakeEncoder)
    router = LearnedRouter.load(tmp_path, "chat", threshold=0.125)
    assert isinstance(router.encoder, FakeEncoder)
    assert router.encoder.kwargs == {"max_tokens": 16, "precision": "float32", "layers": None}
    assert router.threshold == 0.125
    assert router.classify(["solve x"])[0].category in (*CATS, "chat")


@pytest.mark.parametrize("encoder", [{"dist": "other-encoder", "version": ENCODER_VERSION},
                                     {"dist": ENCODER_DIST, "version": "9.9"}, {}])
def test_learned_router_load_rejects_a_head_trained_with_another_encoder(tmp_path, encoder):
    head = make_head()
    Head(head.net, HeadMeta(CATS, DIM, 0, 1.0, 0.3, encoder)).save(tmp_path)
    with pytest.raises(RouterUnavailable) as info:
        LearnedRouter.load(tmp_path, "chat", encoder=FakeEncoder())
    assert str(tmp_path) in info.value.message
    assert "coe router train" in info.value.message
