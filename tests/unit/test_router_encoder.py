"""The encoder's pure parts: per-row int8 linears and length-bucketed batching."""
from __future__ import annotations

import torch
from torch import nn

from coe.router.encoder import RowInt8Linear, _int8_linears, _length_batches, pad_rows


def test_row_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)
    exact = linear(x)
    approx = RowInt8Linear(linear)(x)
    assert approx.shape == exact.shape
    cos = torch.nn.functional.cosine_similarity(approx.flatten(0, 1), exact.flatten(0, 1), dim=-1)
    assert cos.min() > 0.999


def test_row_int8_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(1)
    layer = RowInt8Linear(nn.Linear(32, 16))
    row = torch.randn(1, 32)
    alone = layer(row)
    with_big_neighbour = layer(torch.cat([row, 1000 * torch.randn(3, 32)]))[:1]
    assert torch.equal(alone, with_big_neighbour)  # per-tensor scaling would change this row


def test_int8_conversion_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 4)))
    converted = _int8_linears(model)
    kinds = [type(m).__name__ for m in converted.modules()]
    assert "Linear" not in kinds and kinds.count("RowInt8Linear") == 2


def test_length_batches_cover_every_index_once_within_the_token_budget():
    lengths = [5, 120, 7, 7, 64, 3, 128, 30, 30, 31]
    batches = _length_batches(lengths, batch_tokens=128)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 128
    assert [lengths[i] for i in flat] == sorted(lengths)  # sorted, so padding stays small


def test_pad_builds_ids_and_mask():
    ids, mask = pad_rows([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
