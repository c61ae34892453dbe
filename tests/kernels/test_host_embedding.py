"""The input embedding kept in host memory (model.offload_embedding, kernels/host_embedding.py) on the CPU: the
gather kernel (Triton's interpreter) equals indexing, NaN for ids outside the table; which embeddings may move and
why others stay; the moved module keeps its interface (same outputs, state dict, hooks, deep copies; model moves
leave it in place, dtype changes apply); the config setting's rules. The GPU's zero-copy read is checked in
tests/gpu/test_host_embedding_gpu.py."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer

from tunelab.config import load_config
from tunelab.errors import UserError
from tunelab.kernels import host_embedding
from tunelab.kernels.fast_path import apply_embedding_offload
from tunelab.kernels.host_embedding import HostEmbedding, move_to_host, why_not_offloadable


def test_gather_kernel_equals_indexing_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        import tunelab
        from tunelab.kernels.host_embedding import gather_rows

        g = torch.Generator().manual_seed(0)
        for rows, hidden, dtype in [(50, 70, torch.float32), (9, 4096 + 5, torch.bfloat16), (300, 64, torch.float16)]:
            table = torch.randn(rows, hidden, generator=g).to(dtype)
            ids = torch.randint(0, rows, (2, 11), generator=g)
            out = gather_rows(table, ids, torch.device("cpu"))
            assert out.shape == (2, 11, hidden) and out.dtype == dtype
            assert torch.equal(out, table[ids]), (rows, hidden, dtype)
        table = torch.randn(5, 8)
        out = gather_rows(table, torch.tensor([4, 5, -1, 0]), torch.device("cpu"))
        assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
        assert torch.equal(out[0], table[4]) and torch.equal(out[3], table[0])
        assert gather_rows(table, torch.zeros(0, dtype=torch.long), torch.device("cpu")).shape == (0, 8)
        print("interpreter ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreter ok" in result.stdout


@pytest.fixture()
def model() -> torch.nn.Module:
    model = make_tiny_llama(make_tokenizer("chatml"))
    model.requires_grad_(False)
    return model


def test_which_embeddings_may_move(model: torch.nn.Module) -> None:
    assert why_not_offloadable(model, min_bytes=0) == "the input embedding is not on a GPU"  # every other rule holds
    assert "smaller than" in why_not_offloadable(model, min_bytes=1 << 30)
    model.get_input_embeddings().weight.requires_grad_(True)
    assert why_not_offloadable(model, 0) == "the input embedding is trained"
    model.get_input_embeddings().weight.requires_grad_(False)
    model.lm_head.weight = model.get_input_embeddings().weight  # shared storage, whatever the config says
    assert "shares" in why_not_offloadable(model, 0)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone(), requires_grad=False)
    assert "shares" in why_not_offloadable(model, 0)  # the config ties them (a later tie_weights would share)


def test_subclassed_or_renormalizing_embeddings_stay(model: torch.nn.Module) -> None:
    class Scaled(torch.nn.Embedding):
        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
            return super().forward(input) * 2.0

    table = model.get_input_embeddings()
    table.max_norm = 1.0
    assert "max_norm" in why_not_offloadable(model, 0)
    table.max_norm = None
    table.__class__ = Scaled
    assert "plain torch.nn.Embedding" in why_not_offloadable(model, 0)


def test_moved_module_keeps_its_interface(model: torch.nn.Module) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    expected = model(input_ids=ids).logits
    keys = list(model.state_dict())
    table = model.get_input_embeddings()
    seen = []
    table.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    move_to_host(table)
    assert isinstance(table, HostEmbedding) and isinstance(table, torch.nn.Embedding)
    assert torch.equal(model(input_ids=ids).logits, expected)  # inputs on the table's device: nn.Embedding's path
    assert seen == [(2, 9, 64)] and list(model.state_dict()) == keys  # the hook registered before the move runs
    twin = copy.deepcopy(model)
    assert isinstance(twin.get_input_embeddings(), HostEmbedding)
    assert torch.equal(twin(input_ids=ids).logits, expected)
    model.to(torch.float16)  # a dtype change applies to the table (still in host memory) ...
    assert table.weight.dtype == torch.float16 and table.weight.device.type == "cpu"
    assert model.lm_head.weight.dtype == torch.float16


def test_trained_after_the_move_is_an_error_not_a_silent_zero_gradient(model: torch.nn.Module) -> None:
    table = model.get_input_embeddings()
    move_to_host(table)
    table.weight.requires_grad_(True)
    fake_cuda_ids = torch.zeros(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="offload_embedding"):
        HostEmbedding.forward(table, _CudaLooking(fake_cuda_ids))


class _CudaLooking(torch.Tensor):
    """An id tensor that claims a CUDA device (the error is raised before any read)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> _CudaLooking:
        return torch.Tensor._make_subclass(cls, data)

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def _config(setting: object) -> object:
    return load_config(
        {
            "model": {"offload_embedding": setting},
            "method": {"kind": "lora"},
            "data": {"train": "unused.jsonl"},
        }
    )


def test_setting_rules(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _config("auto").model.offload_embedding == "auto"
    assert apply_embedding_offload(model, _config(True), torch.device("cpu")) == 0  # nothing to move on a CPU
    calls = []
    monkeypatch.setattr("tunelab.kernels.fast_path.offload_input_embedding", lambda m, b: calls.append(b) or 1)
    cuda = torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert apply_embedding_offload(model, _config("auto"), cuda) == 0 and not calls
    with pytest.raises(UserError, match="one process"):
        apply_embedding_offload(model, _config(True), cuda)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert apply_embedding_offload(model, _config(False), cuda) == 0 and not calls
    assert apply_embedding_offload(model, _config("auto"), cuda) == 1 and calls == [host_embedding.MIN_BYTES]
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(UserError, match="is trained"):
        apply_embedding_offload(model, _config(True), cuda)
