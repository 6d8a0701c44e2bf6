"""TorchBackend on tiny random checkpoints written by conftest (real torch, real safetensors)."""
import json
import shutil

import pytest
import torch

from coe.backends import get_backend
from coe.backends.memory import HostBufferPool
from coe.backends.torch import ByteVocab, TorchBackend, TorchRunner
from coe.config import ExpertConfig
from coe.engine.batch import generate as generate_events
from coe.engine.batch import prompt_of
from coe.errors import ConfigError, ContextLengthExceeded, LoadError
from coe.models import backend_of
from coe.types import ChatMessage, Request, SamplingParams

PROMPT = "The quick brown fox"


def expert_for(path, **params) -> ExpertConfig:
    return ExpertConfig("tiny", str(path), backend="torch_hf", params=params)


def load(path, **params) -> TorchRunner:
    backend = TorchBackend()
    return backend.materialize(backend.read(expert_for(path, **params), path, HostBufferPool()))


def generate(runner, prompt=PROMPT, messages=None, **sampling):
    """(text joined from deltas, final event) of one request."""
    request = Request("tiny", SamplingParams(**sampling), prompt=None if messages else prompt, messages=messages)
    events = list(generate_events(runner, [request]))
    final = events[-1]
    assert all(not e.is_final for e in events[:-1])
    assert final.error is None, final.error
    return "".join(e.delta for e in events), final.completion


def sample_ids(runner, prompt_ids, count, **sampling):
    """The ids one sequence decodes alone (EOS ignored)."""
    decoder = runner.open_decoder()
    decoder.add(0, prompt_ids, SamplingParams(max_tokens=count, **sampling))
    try:
        return [decoder.step()[0].id for _ in range(count)]
    finally:
        decoder.close()


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def qwen2_runner(tiny_qwen2_checkpoint):
    return load(tiny_qwen2_checkpoint)


# ---- read and materialize ----------------------------------------------------------------------

def test_read_keeps_weights_on_the_host(tiny_checkpoint):
    host = TorchBackend().read(expert_for(tiny_checkpoint), tiny_checkpoint, HostBufferPool())
    args, state = host.payload.args, host.payload.state
    assert args.model_type == "llama"
    assert host.info.format == "safetensors"
    assert host.num_bytes == (tiny_checkpoint / "model.safetensors").stat().st_size
    assert "lm_head.weight" not in state
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())


def test_read_fills_one_pooled_buffer_and_views_it_without_copies(tiny_checkpoint):
    pool = HostBufferPool()
    host = TorchBackend().read(expert_for(tiny_checkpoint), tiny_checkpoint, pool)
    size = (tiny_checkpoint / "model.safetensors").stat().st_size
    assert host.footprint_bytes == size  # one buffer, float32 checkpoint read as float32: no conversion
    assert pool.num_allocated == 1 and pool.free_bytes == 0
    state = host.payload.state
    buffer_ptr = next(iter(state.values())).untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == buffer_ptr for t in state.values())
    from safetensors.torch import load_file
    saved = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert set(state) == set(saved)
    assert all(torch.equal(state[name], saved[name]) for name in saved)


def test_release_returns_the_buffer_and_the_next_read_reuses_it(tiny_checkpoint, make_checkpoint):
    pool = HostBufferPool()
    backend = TorchBackend()
    first = backend.read(expert_for(tiny_checkpoint), tiny_checkpoint, pool)
    first.release()
    first.release()  # twice is harmless
    assert first.payload is None
    size = (tiny_checkpoint / "model.safetensors").stat().st_size
    assert pool.free_bytes == size
    other = make_checkpoint("same-shape", seed=5)  # the same size, other weights
    second = backend.read(expert_for(other), other, pool)
    assert pool.num_reused == 1 and pool.num_allocated == 1 and pool.free_bytes == 0
    from safetensors.torch import load_file
    saved = load_file(str(other / "model.safetensors"))
    assert all(torch.equal(second.payload.state[name], saved[name]) for name in saved)  # no stale bytes
    text, _ = generate(backend.materialize(second), max_tokens=3, temperature=0.0)
    assert isinstance(text, str)


def test_materialize_on_cpu_shares_the_host_buffer(tiny_checkpoint):
    backend = TorchBackend()
    host = backend.read(expert_for(tiny_checkpoint), tiny_checkpoint, HostBufferPool())
    runner = backend.materialize(host)
    buffer_ptr = next(iter(host.payload.state.values())).untyped_storage().data_ptr()
    assert {p.untyped_storage().data_ptr() for p in runner.model.parameters()} == {buffer_ptr}
    assert runner.footprint_bytes >= 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_views_at_same_offsets_rebuild_every_tensor_from_a_copy_of_the_buffer(tiny_checkpoint, dtype):
    """What CUDA's one-copy materialize does, checked on CPU: tensors that view the host buffer
    become views of the copy; converted ones (bfloat16 from a float32 file) are copied alone."""
    from coe.backends.torch import views_at_same_offsets

    warm = TorchBackend().read(expert_for(tiny_checkpoint, dtype=dtype), tiny_checkpoint, HostBufferPool()).payload
    copy = warm.buffer.clone()
    moved = views_at_same_offsets(warm.state, warm.buffer, copy)
    assert set(moved) == set(warm.state)
    for name, tensor in warm.state.items():
        assert torch.equal(moved[name], tensor) and moved[name].dtype == tensor.dtype
        in_copy = moved[name].untyped_storage().data_ptr() == copy.untyped_storage().data_ptr()
        assert in_copy == (dtype == "float32"), name
    warm.buffer.fill_(0)  # the views read the copy, not the host buffer
    assert any(moved[name].abs().sum() > 0 for name in moved)


def test_a_dtype_conversion_counts_in_the_footprint(tiny_checkpoint):
    host = TorchBackend().read(expert_for(tiny_checkpoint, dtype="bfloat16"), tiny_checkpoint, HostBufferPool())
    size = (tiny_checkpoint / "model.safetensors").stat().st_size
    state = host.payload.state
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert host.footprint_bytes == size + sum(t.nbytes for t in state.values())


def test_a_corrupt_safetensors_header_is_a_load_error_and_the_buffer_goes_back(tiny_checkpoint, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"not json"
    weights.write_bytes(bytes(data))
    pool = HostBufferPool()
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        TorchBackend().read(expert_for(folder), folder, pool)
    assert pool.free_bytes == len(data)


def test_tensors_in_copies_a_misaligned_tensor(tmp_path):
    from safetensors.torch import save_file

    from coe.backends.torch import tensors_in

    path = tmp_path / "t.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(3, dtype=torch.uint8)}, str(path))
    raw = path.read_bytes()
    aligned = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    tensors = tensors_in(aligned, path)
    assert torch.equal(tensors["w"], torch.arange(6, dtype=torch.float32).view(2, 3))
    assert torch.equal(tensors["b"], torch.ones(3, dtype=torch.uint8))
    shifted = torch.frombuffer(bytearray(b"\0" + raw), dtype=torch.uint8)[1:]  # every offset off by one
    moved = tensors_in(shifted, path)
    assert torch.equal(moved["w"], tensors["w"]) and torch.equal(moved["b"], tensors["b"])


def test_materialize_builds_on_meta_and_loads_every_parameter(runner, tiny_checkpoint):
    params = dict(runner.model.named_parameters(remove_duplicate=False))
    assert params, "no parameters"
    assert [n for n, p in params.items() if p.is_meta] == []
    assert all(p.device.type == "cpu" for p in params.values())
    assert not runner.model.training
    assert torch.equal(params["lm_head.weight"], params["model.embed_tokens.weight"])  # tied
    from safetensors.torch import load_file
    saved = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert torch.equal(params["model.layers.1.mlp.down_proj.weight"], saved["model.layers.1.mlp.down_proj.weight"])
    assert isinstance(runner.vocab, ByteVocab)
    assert runner.context_length == 512  # min(default 4096, max_position_embeddings)


def test_materialize_uses_meta_device_for_construction(tiny_checkpoint, monkeypatch):
    import coe.backends.torch as torch_backend

    devices = []
    real_build = torch_backend.build_model

    def spy(args):
        model = real_build(args)
        devices.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(torch_backend, "build_model", spy)
    load(tiny_checkpoint)
    assert devices == [{"meta"}]


def test_bfloat16_dtype_param(tiny_checkpoint):
    bf16 = load(tiny_checkpoint, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    text, completion = generate(bf16, max_tokens=4, temperature=0.0)
    assert completion.completion_tokens + (completion.finish_reason == "stop") >= 1


def test_bad_params_are_config_errors_and_a_missing_device_a_load_error(tiny_checkpoint):
    with pytest.raises(ConfigError, match="params.dtype: expected one of float32, bfloat16, float16"):
        load(tiny_checkpoint, dtype="int8")
    with pytest.raises(ConfigError, match="params.n_ctxx: unknown field"):
        load(tiny_checkpoint, n_ctxx=8192)
    with pytest.raises(ConfigError, match="params.max_sequences: expected an integer"):
        load(tiny_checkpoint, max_sequences="8")
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="CUDA"):
            load(tiny_checkpoint, device="cuda")


def test_qwen2_checkpoint_loads_its_qkv_biases(qwen2_runner, tiny_qwen2_checkpoint):
    from safetensors.torch import load_file
    saved = load_file(str(tiny_qwen2_checkpoint / "model.safetensors"))
    bias = qwen2_runner.model.model.layers[0].self_attn.q_proj.bias
    assert bias is not None and torch.equal(bias, saved["model.layers.0.self_attn.q_proj.bias"])
    assert bias.abs().sum() > 0
    assert qwen2_runner.model.model.layers[0].self_attn.o_proj.bias is None


def test_backend_lookup():
    assert isinstance(get_backend("torch_hf"), TorchBackend)
    with pytest.raises(ConfigError, match="unknown backend"):
        get_backend("vllm")


def test_auto_backend_is_torch_for_folders_and_llama_cpp_for_files(tiny_checkpoint):
    assert backend_of(ExpertConfig("x", str(tiny_checkpoint))) == "torch_hf"
    assert backend_of(ExpertConfig("x", str(tiny_checkpoint / "model.safetensors"))) == "llama_cpp"
    assert backend_of(ExpertConfig("x", "x.gguf", backend="torch_hf")) == "torch_hf"
    assert backend_of(ExpertConfig("x", "smollm2-135m")) == "llama_cpp"  # packaged models are GGUF


# ---- generation --------------------------------------------------------------------------------

def test_greedy_generation_is_deterministic(runner):
    first = generate(runner, max_tokens=24, temperature=0.0)
    second = generate(runner, max_tokens=24, temperature=0.0)
    assert first == second
    assert first[1].prompt_tokens == len(PROMPT) + 1  # BOS + bytes


def test_same_seed_same_sample_and_different_seeds_differ(runner):
    prompt_ids = runner.vocab.encode(PROMPT)
    a = sample_ids(runner, prompt_ids, 24, temperature=1.0, seed=7)
    b = sample_ids(runner, prompt_ids, 24, temperature=1.0, seed=7)
    c = sample_ids(runner, prompt_ids, 24, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    assert generate(runner, max_tokens=24, temperature=1.0, seed=3) == \
        generate(runner, max_tokens=24, temperature=1.0, seed=3)


def test_top_p_restricts_sampling_to_the_top_token(runner):
    prompt_ids = runner.vocab.encode(PROMPT)
    greedy = sample_ids(runner, prompt_ids, 12, temperature=0.0)
    assert sample_ids(runner, prompt_ids, 12, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_unseeded_sampling_leaves_the_global_torch_rng_alone(runner):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    generate(runner, max_tokens=3, temperature=1.0)
    assert torch.equal(torch.rand(3), expected)


def test_unseeded_samples_differ(runner):
    prompt_ids = runner.vocab.encode(PROMPT)
    assert sample_ids(runner, prompt_ids, 24, temperature=1.0) != sample_ids(runner, prompt_ids, 24, temperature=1.0)


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_max_tokens_is_respected(runner, max_tokens):
    _, completion = generate(runner, max_tokens=max_tokens, temperature=0.0)
    if completion.finish_reason == "length":
        assert completion.completion_tokens == max_tokens
    else:
        assert completion.finish_reason == "stop" and completion.completion_tokens < max_tokens


def test_deltas_add_up_to_the_completion_text(runner):
    text, completion = generate(runner, max_tokens=30, temperature=1.0, seed=11)
    assert text == completion.text
    ids = sample_ids(runner, runner.vocab.encode(PROMPT), 30, temperature=1.0, seed=11)
    ids = ids[:ids.index(ByteVocab.EOS)] if ByteVocab.EOS in ids else ids
    assert completion.text == b"".join(runner.vocab.token_bytes(i) for i in ids).decode("utf-8", "replace")


@pytest.mark.parametrize("which", ["runner", "qwen2_runner"])
def test_kv_cache_matches_a_full_forward(request, which):
    runner = request.getfixturevalue(which)
    model = runner.model
    prompt_ids = runner.vocab.encode(PROMPT)
    generated = sample_ids(runner, prompt_ids, 12, temperature=0.0)
    sequence = prompt_ids + generated
    with torch.inference_mode():
        cache = runner.new_cache(1, len(sequence))
        model(torch.tensor([prompt_ids]), cache, 0)  # prefill
        for position in range(len(prompt_ids), len(sequence)):
            incremental = model(torch.tensor([sequence[position:position + 1]]), cache, position)[0]  # [V]
        full = model(torch.tensor([sequence]), runner.new_cache(1, len(sequence)), 0)[0]  # [V]
        # greedy decoding through the cache picked what a full forward over each prefix picks
        for k in range(1, len(generated)):
            prefix = sequence[:len(prompt_ids) + k]
            logits = model(torch.tensor([prefix]), runner.new_cache(1, len(prefix)), 0)[0]
            assert int(torch.argmax(logits)) == generated[k]
    assert full.shape == (258,)
    torch.testing.assert_close(incremental, full, atol=1e-4, rtol=1e-4)


def test_position_matters(runner):
    """RoPE is applied: the same token at another position gives other logits."""
    with torch.inference_mode():
        a = runner.model(torch.tensor([[65, 66]]), runner.new_cache(1, 2), 0)
        b = runner.model(torch.tensor([[67, 65, 66]]), runner.new_cache(1, 3), 0)
    assert not torch.allclose(a, b)


def test_stop_string_ends_generation_before_it(runner):
    full, _ = generate(runner, max_tokens=40, temperature=0.0)
    stop = full[10:12]
    expected = full[:full.index(stop)]
    text, completion = generate(runner, max_tokens=40, temperature=0.0, stop=(stop,))
    assert text == completion.text == expected
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens < 40


def test_chat_without_template_uses_the_plain_transcript(runner):
    messages = (ChatMessage("user", "hi"),)
    prompt, stop = prompt_of(runner.vocab, Request("tiny", messages=messages))
    assert prompt == "User: hi\nAssistant:" and stop == ("\nUser:",)
    _, completion = generate(runner, messages=messages, max_tokens=3, temperature=0.0)
    assert completion.prompt_tokens == len(prompt) + 1


def test_chat_template_from_tokenizer_config(tiny_checkpoint, tmp_path):
    folder = tmp_path / "chat"
    shutil.copytree(tiny_checkpoint, folder)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    runner = load(folder)
    prompt, stop = prompt_of(runner.vocab, Request("tiny", messages=(ChatMessage("user", "hi"),)))
    assert (prompt, stop) == ("<user>hi<assistant>", ())


def test_cancelled_request_stops(runner):
    request = Request("tiny", SamplingParams(max_tokens=10), prompt=PROMPT)
    request.cancel()
    events = list(generate_events(runner, [request]))
    assert len(events) == 1
    assert events[0].completion.finish_reason == "cancelled"
    assert events[0].completion.completion_tokens == 0


def test_context_length_exceeded(tiny_checkpoint):
    small = load(tiny_checkpoint, n_ctx=32)
    assert small.context_length == 32
    request = Request("tiny", SamplingParams(max_tokens=20), prompt="x" * 12)  # 13 prompt tokens + 20 > 32
    (event,) = list(generate_events(small, [request]))
    assert isinstance(event.error, ContextLengthExceeded)
    assert event.error.code == "context_length_exceeded"
    assert "32" in event.error.message
    # exactly at the limit is fine
    _, completion = generate(small, prompt="x" * 11, max_tokens=20, temperature=0.0)
    assert completion.prompt_tokens + 20 == 32


def test_n_ctx_is_capped_by_max_position_embeddings(tiny_checkpoint):
    assert load(tiny_checkpoint, n_ctx=100_000).context_length == 512


# ---- load errors -------------------------------------------------------------------------------

def with_config(tiny_checkpoint, tmp_path, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_checkpoint, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"model_type": None}, "model_type None is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_size": None}, "missing hidden_size"),
])
def test_unsupported_config_is_a_load_error(tiny_checkpoint, tmp_path, changes, match):
    folder = with_config(tiny_checkpoint, tmp_path, **changes)
    with pytest.raises(LoadError, match=match):
        TorchBackend().read(expert_for(folder), folder, HostBufferPool())


def test_unreadable_config_is_a_load_error(tiny_checkpoint, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="config.json"):
        TorchBackend().read(expert_for(folder), folder, HostBufferPool())
    (folder / "config.json").unlink()
    with pytest.raises(LoadError, match="config.json"):
        TorchBackend().read(expert_for(folder), folder, HostBufferPool())


@pytest.mark.parametrize("changes", [{"hidden_size": 32}, {"num_hidden_layers": 3}, {"intermediate_size": 64},
                                     {"model_type": "qwen2"}, {"vocab_size": 300}])
def test_weights_not_matching_config_are_a_load_error(tiny_checkpoint, tmp_path, changes):
    folder = with_config(tiny_checkpoint, tmp_path, **changes)
    backend = TorchBackend()
    host = backend.read(expert_for(folder), folder, HostBufferPool())
    with pytest.raises(LoadError, match="weights do not match config.json"):
        backend.materialize(host)


def test_untied_checkpoint_without_lm_head_is_a_load_error(tiny_checkpoint, tmp_path):
    folder = with_config(tiny_checkpoint, tmp_path, tie_word_embeddings=False)
    backend = TorchBackend()
    with pytest.raises(LoadError, match="lm_head"):
        backend.materialize(backend.read(expert_for(folder), folder, HostBufferPool()))


def test_small_vocab_without_tokenizer_is_a_load_error(make_checkpoint):
    folder = make_checkpoint("tiny-vocab", vocab_size=100)
    with pytest.raises(LoadError, match="byte tokenizer"):
        load(folder)


def test_folder_without_weights_is_not_loadable(tiny_checkpoint, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder)
    with pytest.raises(Exception) as info:
        TorchBackend().read(expert_for(folder), folder, HostBufferPool())
    assert "no *.safetensors" in str(info.value)


# ---- tokenizer.json checkpoints ----------------------------------------------------------------

def byte_level_bpe(path, vocab_size: int) -> None:
    """Train a tiny byte-level BPE tokenizer in memory (no download) and save tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox", "naïve café — ünïcode 🙂"] * 10, trainer)
    assert tok.get_vocab_size() == vocab_size
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def bpe_runner(make_checkpoint):
    folder = make_checkpoint("tiny-bpe", vocab_size=300)
    byte_level_bpe(folder, 300)
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{{ '<|im_start|>assistant\\n' }}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    return load(folder)


def test_tokenizer_json_vocab_round_trips_bytes(bpe_runner):
    vocab = bpe_runner.vocab
    assert type(vocab).__name__ == "HFTokenizerVocab"
    text = "naïve 🙂 café, hello"
    ids = vocab.encode("<|im_start|>" + text + "<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # special tokens parsed as single ids
    assert b"".join(vocab.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert vocab.is_end(2) and vocab.is_end(0) and not vocab.is_end(ids[1])
    assert vocab.chat_template.startswith("{% for m in messages %}")


def test_tokenizer_json_checkpoint_generates_chat(bpe_runner):
    text, completion = generate(bpe_runner, messages=(ChatMessage("user", "hello café"),), max_tokens=8,
                                temperature=0.0)
    assert completion.prompt_tokens == len(bpe_runner.vocab.encode(
        "<|im_start|>user\nhello café<|im_end|>\n<|im_start|>assistant\n"))
    assert text == completion.text


def test_sharded_checkpoint_whose_first_shard_has_an_odd_size(tiny_checkpoint, tmp_path):
    """Shards are read back to back into one buffer: the second one starts at an odd offset, so its
    float tensors cannot be viewed in place and are copied."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, folder)
    saved = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(saved)
    save_file({names[0]: saved[names[0]], "odd.marker": torch.ones(3, dtype=torch.uint8)},
              str(folder / "model-00001-of-00002.safetensors"))
    save_file({name: saved[name] for name in names[1:]}, str(folder / "model-00002-of-00002.safetensors"))
    assert (folder / "model-00001-of-00002.safetensors").stat().st_size % 2 == 1
    host = TorchBackend().read(expert_for(folder), folder, HostBufferPool())
    state = host.payload.state
    assert all(torch.equal(state[name], saved[name]) for name in saved)
    del state["odd.marker"]
    assert generate(TorchBackend().materialize(host), max_tokens=3, temperature=0.0)[1].completion_tokens >= 0
