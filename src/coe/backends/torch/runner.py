"""A torch expert ready to generate: its module on the device and a batched decoder over it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coe.backends.base import Adapter, Decoder, Runner, Vocab
from coe.backends.sampling import SamplerDefaults, Token, TokenSampler
from coe.backends.torch.model import CausalLM, LoraRows
from coe.config import ExpertConfig, TorchParams
from coe.types import SamplingParams

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v) [B, h_kv, L, d]


class TorchRunner(Runner):
    def __init__(
        self,
        expert: ExpertConfig,
        params: TorchParams,
        vocab: Vocab,
        model: CausalLM,
        device: torch.device,
        num_bytes: int,
        context_length: int,
        lora_rows: LoraRows | None = None,
    ):
        super().__init__(
            expert,
            vocab,
            context_length,
            num_bytes,
            params.max_sequences,
            SamplerDefaults.of(params),
        )
        self.model, self.device = model, device
        self.lora_rows = lora_rows or LoraRows()
        self._attached: dict[int, tuple[Adapter, dict]] = {}  # id(adapter) -> its device weights
        vocab.n_vocab = model.args.vocab_size

    def set_lora(self, adapters: list[Adapter | None]) -> None:
        """The adapter of each row of the next forward pass (None: the base alone)."""
        rows = self.lora_rows
        key = tuple(id(a) if a is not None else 0 for a in adapters)
        if key == rows.key:
            return
        rows.key = key
        weights = [self._on_device(a) if a is not None else None for a in adapters]
        present = [w for w in weights if w]
        if not present:
            rows.stacked = {}
            return
        rank = max(a.shape[0] for w in present for a, _ in w.values())
        stacked = {}
        for module in dict.fromkeys(m for w in present for m in w):
            a0, b0 = next(w[module] for w in present if module in w)
            a_rows = a0.new_zeros((len(adapters), rank, a0.shape[1]))
            b_rows = b0.new_zeros((len(adapters), b0.shape[0], rank))
            for row, (w, adapter) in enumerate(zip(weights, adapters)):
                if w and module in w and adapter is not None:
                    a, b = w[module]
                    a_rows[row, : a.shape[0]] = a
                    b_rows[row, :, : b.shape[1]] = b * adapter.scale
            stacked[module] = (a_rows, b_rows)
        rows.stacked = stacked

    def _on_device(self, adapter: Adapter) -> dict:
        """The adapter's A/B on the runner's device: its host tensors on CPU, copied once on CUDA."""
        if self.device.type == "cpu":
            return adapter.payload
        held = self._attached.get(id(adapter))
        if held is None or held[0] is not adapter:
            moved = {
                k: (a.to(self.device), b.to(self.device)) for k, (a, b) in adapter.payload.items()
            }
            held = self._attached[id(adapter)] = (adapter, moved)
        return held[1]

    def open_decoder(self) -> Decoder:
        return TorchDecoder(self)

    def new_cache(self, batch: int, length: int) -> KVCache:
        """Zeros: a batch's rows attend over columns that are masked but not all written yet, and
        a masked NaN would still make the attention output NaN."""
        args = self.model.args
        dtype = next(self.model.parameters()).dtype
        shape = (batch, args.num_key_value_heads, length, args.head_dim)
        return [
            (
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
            )
            for _ in range(args.num_hidden_layers)
        ]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._attached.clear()


@dataclass
class _Pending:
    prompt_ids: list[int]
    sampler: TokenSampler
    adapter: Adapter | None


class TorchDecoder(Decoder):
    """Row r of the KV cache [B, h_kv, L, d] holds sequence ``rows[r]``, its token at position p in
    column p. A step decodes one token for every row in one forward pass, then prefills the new
    sequences together (right-padded) and appends their rows; a removed sequence's row is dropped
    before the next step. Every row has its own cells: a sequence fits if it fits the context."""

    def __init__(self, runner: TorchRunner):
        self.runner = runner
        self.max_sequences = runner.max_sequences
        self.rows: list[int] = []  # sequence of each cache row
        self.cached: list[int] = []  # tokens in each row's cache = position of its next token
        self.cache: KVCache | None = None
        self.samplers: dict[int, TokenSampler] = {}
        self.adapters: dict[int, Adapter | None] = {}  # per sequence: rows may differ
        self.last: dict[int, int] = {}
        self.pending: dict[int, _Pending] = {}
        self.removed: set[int] = set()
        runner.lora_rows.key = None  # adapters of an earlier decoder may be gone

    def has_room(self, need_tokens: int) -> bool:
        live = len(self.rows) - len(self.removed) + len(self.pending)
        return self.runner.fits(live, 0, need_tokens)

    def add(
        self,
        seq: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: Adapter | None = None,
    ) -> None:
        self.pending[seq] = _Pending(prompt_ids, self.runner.sampler(sampling), adapter)

    def remove(self, seq: int) -> None:
        if self.pending.pop(seq, None) is None:
            self.removed.add(seq)
        self.samplers.pop(seq, None)
        self.adapters.pop(seq, None)

    def step(self) -> dict[int, Token]:
        tokens: dict[int, Token] = {}
        with torch.inference_mode():
            self._drop_removed()
            if self.rows:
                tokens.update(self._decode())
            if self.pending:
                tokens.update(self._prefill())
        return tokens

    def _decode(self) -> dict[int, Token]:
        runner = self.runner
        ids = torch.tensor(
            [[self.last[s]] for s in self.rows], dtype=torch.long, device=runner.device
        )
        runner.set_lora([self.adapters.get(s) for s in self.rows])
        logits = runner.model(ids, self.cache, self.cached).float().cpu().numpy()  # [B, V]
        self.cached = [n + 1 for n in self.cached]
        return self._pick(self.rows, logits)

    def _prefill(self) -> dict[int, Token]:
        runner, seqs = self.runner, list(self.pending)
        prompts = [self.pending[s].prompt_ids for s in seqs]
        lengths = [len(p) for p in prompts]
        ids = torch.zeros((len(seqs), max(lengths)), dtype=torch.long)  # right-padded with token 0
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        length = self.cache[0][0].shape[2] if self.cache else 0
        length = max(
            length, max(lengths) + max(self.pending[s].sampler.sampling.max_tokens for s in seqs)
        )
        cache = runner.new_cache(len(seqs), length)
        last = torch.tensor(lengths, device=runner.device) - 1
        runner.set_lora([self.pending[s].adapter for s in seqs])
        logits = runner.model(ids.to(runner.device), cache, 0, last=last).float().cpu().numpy()
        self._append_rows(cache, length)
        for s in seqs:
            pending = self.pending.pop(s)
            self.samplers[s], self.adapters[s] = pending.sampler, pending.adapter
        self.rows, self.cached = [*self.rows, *seqs], [*self.cached, *lengths]
        return self._pick(seqs, logits)

    def _pick(self, seqs: list[int], logits) -> dict[int, Token]:
        tokens = {}
        for row, s in enumerate(seqs):
            token = self.samplers[s].pick(logits[row])
            self.last[s], tokens[s] = token.id, token
        return tokens

    def _append_rows(self, cache: KVCache, length: int) -> None:
        """The new rows after the running ones, every row padded to ``length`` columns."""
        if self.cache is None or not self.rows:
            self.cache = cache
            return
        self.cache = [
            (torch.cat((_pad(k, length), nk)), torch.cat((_pad(v, length), nv)))
            for (k, v), (nk, nv) in zip(self.cache, cache)
        ]

    def _drop_removed(self) -> None:
        if not self.removed:
            return
        kept = [row for row, s in enumerate(self.rows) if s not in self.removed]
        if len(kept) < len(self.rows) and kept:
            index = torch.tensor(kept, device=self.runner.device)
            self.cache = [
                (k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache or []
            ]
        elif not kept:
            self.cache = None
        self.rows = [self.rows[row] for row in kept]
        self.cached = [self.cached[row] for row in kept]
        for s in self.removed:
            self.last.pop(s, None)
        self.removed.clear()

    def close(self) -> None:
        self.cache, self.rows, self.cached = None, [], []
        self.pending.clear()
        self.samplers.clear()


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, h, L, d] with L grown to ``length`` by zero columns."""
    extra = length - t.shape[2]
    return t if extra <= 0 else torch.nn.functional.pad(t, (0, 0, 0, extra))
