"""kernels/varlen_attention.py on the CPU: sequence boundaries from packed position ids, and a model switched to
"tunelab_varlen" computes what SDPA computes wherever the variable-length kernel does not apply (CPU tensors,
eval, generation). The kernel itself is compared with per-example runs in tests/gpu/test_varlen_attention_gpu.py."""

from __future__ import annotations

import torch
from fixtures import make_tiny_llama, make_tokenizer

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
