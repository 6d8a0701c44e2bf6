"""Fine-tune the sentence encoder's top layers on the router's labelled prompts.

The packaged MiniLM was trained for similarity, not for what a request asks an expert to do: in
a frozen embedding a pasted passage outweighs the request around it. Tuning its top layers with a
throwaway softmax head on the labelled prompts (the hand-written chat-style ones weighted as in
the head's training) moves the embedding toward the task. The lower layers stay frozen, so their
output is computed once per prompt and only the top layers run forward and backward, in float32.

The defaults (``TrainSettings``: the top 2 of 6 layers, 3 epochs over every chat-style training
prompt and 4000 benchmark ones) were chosen on the chat-style validation prompts and dev set;
docs/benchmarks.md "Router" has the numbers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from coe.router.encoder import (
    BertEncoder,
    SentenceEncoder,
    load_bert,
    mean_pool,
    pad_rows,
    token_grid,
)
from coe.router.head import Features, HeadNet, balanced_loss, class_weights, ngram_bag

Progress = Callable[[str, int, int], None]  # (stage, done, total)
STATE_BATCH = 32  # prompts per batch through the frozen layers


def tune_top_layers(
    encoder: SentenceEncoder,
    texts: Sequence[str],
    y: torch.Tensor,
    prompt_weights: torch.Tensor,
    num_classes: int,
    *,
    layers: int,
    epochs: int,
    lr: float,
    head_lr: float,
    head_weight_decay: float,
    batch_size: int,
    seed: int,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """The top ``layers`` layers' weights after tuning, named as in the encoder's state_dict
    (for ``SentenceEncoder.with_layers``). ``lr`` is the layers' learning rate; the throwaway
    head trains at ``head_lr`` with ``head_weight_decay``."""
    torch.manual_seed(seed)
    model = load_bert(encoder.model_dir, encoder.layers)
    stack = model.encoder.layer
    first = len(stack) - layers
    states = _frozen_states(model, stack[:first], [encoder.token_ids(t) for t in texts], progress)
    top = copy.deepcopy(stack[first:]).train()
    head = HeadNet(encoder.dim, 0, num_classes).train()
    bags = [ngram_bag(t) for t in texts]
    weights = class_weights(y, num_classes)
    opt = torch.optim.AdamW(
        [
            {"params": head.parameters(), "lr": head_lr, "weight_decay": head_weight_decay},
            {"params": top.parameters(), "lr": lr, "weight_decay": 0.01},
        ]
    )
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[head_lr, lr], total_steps=steps, pct_start=0.1
    )
    done = 0
    for _ in range(epochs):
        order = torch.randperm(len(y)).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            pooled = _top_forward(top, [states[i] for i in idx])
            logits = head(Features(pooled, [bags[i] for i in idx]))
            loss = balanced_loss(logits, y[idx], weights, prompt_weights[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if progress:
                progress("tune", done, steps)
    return {
        f"encoder.layer.{first + i}.{name}": value.detach().clone()
        for i, layer in enumerate(top)
        for name, value in layer.state_dict().items()
    }


def _frozen_states(
    model: BertEncoder, lower: nn.ModuleList, ids: list[list[int]], progress: Progress | None
) -> list[torch.Tensor]:
    """Each prompt's token states after the frozen layers, [tokens, hidden] in bfloat16 (half
    the memory; the tuned layers run in float32)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with torch.inference_mode():
        for start in range(0, len(order), STATE_BATCH):
            chunk = order[start : start + STATE_BATCH]
            padded, mask = pad_rows([ids[i] for i in chunk])
            real, bias = token_grid(mask)
            x = model.embed(padded, real)
            for layer in lower:
                x = layer(x, real, bias)
            for i, rows in zip(chunk, torch.split(x, mask.sum(1).tolist())):
                out[i] = rows.to(torch.bfloat16)
            if progress:
                progress("prepare", min(start + STATE_BATCH, len(order)), len(order))
    return out


def _top_forward(top: nn.ModuleList, states: list[torch.Tensor]) -> torch.Tensor:
    lengths = torch.tensor([len(s) for s in states])
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    real, bias = token_grid(mask)
    x = torch.cat(states).float()
    for layer in top:
        x = layer(x, real, bias)
    return mean_pool(x, real, mask)
