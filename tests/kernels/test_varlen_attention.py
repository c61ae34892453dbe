"""kernels/varlen_attention.py on the CPU: sequence boundaries from packed position ids, and a model switched to
"tunelab_varlen" computes what SDPA computes wherever the variable-length kernel does not apply (CPU tensors,
eval, generation). The kernel itself is compared with per-example runs in tests/gpu/test_varlen_attention_gpu.py."""

from __future__ import annotations

import inspect

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer

from tunelab.kernels import varlen_attention
from tunelab.kernels.varlen_attention import NAME, sequence_boundaries, use_varlen_attention


def test_boundaries_of_packed_rows() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    offsets, longest = sequence_boundaries(positions)
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4
    assert sequence_boundaries(positions)[0] is offsets  # read once per tensor
    unpacked = torch.arange(5).expand(3, 5).clone()  # plain rows: one sequence each
    assert sequence_boundaries(unpacked)[0].tolist() == [0, 5, 10, 15]


def test_rows_that_do_not_start_at_zero_are_refused() -> None:
    assert sequence_boundaries(torch.tensor([[0, 1, 2], [3, 4, 5]])) is None  # row 2 continues a context


def test_switched_model_equals_sdpa_where_the_kernel_does_not_apply() -> None:
    tokenizer = make_tokenizer("llama3")
    model = make_tiny_llama(tokenizer).train()
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=positions).logits
    assert use_varlen_attention(model)
    assert model.config._attn_implementation == NAME
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=positions).logits
        model.eval()
        padded = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(got, want)
    assert torch.isfinite(padded).all()
    assert not use_varlen_attention(model)  # already switched: nothing left on SDPA


def _per_sequence(query, key, value, offsets, scale):  # noqa: ANN001, ANN202
    """The reference: causal SDPA over each sequence of the flattened batch, grouped heads repeated."""
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    pieces = []
    for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        q, k, v = (t[start:stop].transpose(0, 1)[None] for t in flat)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        pieces.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
    return torch.cat(pieces, dim=2)[0].transpose(0, 1).reshape(batch, length, heads, dim)


@pytest.mark.parametrize("api", ["old", "new"])
def test_the_call_adapts_to_each_varlen_signature(api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch versions spell causality, scale and grouped heads differently; the same attention comes out of both
    spellings (a CPU stand-in for the CUDA kernel with each signature)."""
    seen = {}

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):  # noqa: ANN001, ANN202
        assert is_causal and key.shape[1] == query.shape[1]  # no grouped heads in the old API
        seen["old"] = True
        return _flat(query, key, value, cu_seq_q, None)

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):  # noqa: ANN001, ANN202, E501
        assert window_size == (-1, 0) and enable_gqa
        seen["new"] = True
        return _flat(query, key.repeat_interleave(query.shape[1] // key.shape[1], dim=1),
                     value.repeat_interleave(query.shape[1] // key.shape[1], dim=1), cu_seq_q, scale)  # fmt: skip

    def _flat(q, k, v, offsets, scale):  # noqa: ANN001, ANN202
        out = []
        for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
            piece = [t[start:stop].transpose(0, 1)[None] for t in (q, k, v)]
            out.append(torch.nn.functional.scaled_dot_product_attention(*piece, is_causal=True, scale=scale)[0])
        return torch.cat(out, dim=1).transpose(0, 1)

    function = {"old": old, "new": new}[api]
    names = frozenset(inspect.signature(function).parameters)
    monkeypatch.setattr(varlen_attention, "_varlen_function", lambda: (function, names))
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    offsets = torch.tensor([0, 4, 9, 12, 18], dtype=torch.int32)
    for scale in (None, 0.1):
        got = varlen_attention._varlen_core(query, key, value, offsets, 6, scale)
        want = _per_sequence(query, key, value, offsets, scale)
        assert torch.allclose(got, want, atol=1e-5), (api, scale)
    assert seen == {api: True}


def test_self_check_reports_why_not_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/gpu covers the kernel")
    varlen_attention.self_check.cache_clear()
    problem = varlen_attention.self_check(0)
    assert isinstance(problem, str) and problem
