"""The input embedding in pinned host memory (model.offload_embedding, kernels/host_embedding.py) on CUDA: the GPU's
zero-copy gather equals `weight[ids]` bit for bit; a tiny untied Llama gives the same logits and LoRA gradients
with its table in host memory as on the GPU, with the table's bytes less GPU memory; `model.to("cuda")` leaves it
there; a tied model keeps its table; an id outside the vocabulary gives NaN, not a crash.

    python3 -m pytest tests/gpu/test_host_embedding_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s
"""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab.kernels.host_embedding import HostEmbedding, gather_rows, offload_input_embedding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [4096, 2048, 4097, 8192 + 96, 64])
def test_gather_from_pinned_equals_indexing(dtype: torch.dtype, hidden: int) -> None:
    generator = torch.Generator().manual_seed(hidden)
    table = torch.randn(1000, hidden, generator=generator).to(dtype).pin_memory()
    ids = torch.randint(0, 1000, (3, 257), generator=generator).cuda()
    out = gather_rows(table, ids, ids.device)
    assert out.is_cuda and out.dtype == dtype and out.shape == (3, 257, hidden)
    assert torch.equal(out, table.cuda()[ids])


def test_out_of_range_id_gives_nan_row() -> None:
    table = torch.randn(10, 64).pin_memory()
    out = gather_rows(table, torch.tensor([1, 10, -1, 9], device="cuda"), torch.device("cuda"))
    torch.cuda.synchronize()
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert torch.equal(out[0].cpu(), table[1]) and torch.equal(out[3].cpu(), table[9])


def _tiny_llama(tied: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )  # fmt: skip  (eager attention: a deterministic backward, so gradients compare exactly)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, lora)
    for name, parameter in model.named_parameters():  # B non-zero so every gradient is informative
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def _logits_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_untied_model_same_logits_and_gradients_less_gpu_memory() -> None:
    model = _tiny_llama(tied=False)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 32000, (2, 64), device="cuda")
    expected_logits, expected_grads = _logits_and_grads(reference, ids)
    del reference
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    freed = offload_input_embedding(model, min_bytes=0)
    torch.cuda.synchronize()
    table = model.get_input_embeddings()
    assert isinstance(table, HostEmbedding) and table.weight.device.type == "cpu" and table.weight.is_pinned()
    assert freed == 32000 * 256 * 2 and before - torch.cuda.memory_allocated() >= freed
    logits, grads = _logits_and_grads(model, ids)
    assert torch.equal(logits, expected_logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
    model.to("cuda")  # the run's own moves leave the table in host memory
    assert model.get_input_embeddings().weight.device.type == "cpu"
    assert "base_model.model.model.embed_tokens.weight" in model.state_dict()


def test_tied_model_keeps_its_table_on_the_gpu() -> None:
    model = _tiny_llama(tied=True)
    assert offload_input_embedding(model, min_bytes=0) == 0
    assert model.get_input_embeddings().weight.is_cuda
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
