"""The LoRA training fast path on CUDA (train.fast_kernels): each fused piece equals its plain PyTorch twin forward
and backward on random inputs (fp32: relative error < 1e-5 with TF32 off; bf16: < 1e-2 against the twin computed
in fp32 on the same bf16 inputs), and 50 LoRA steps on a random-init Llama-3.2-1B shape give the same loss curve
with the fast path as without it (within 1% per step).

Runs only where CUDA is visible (the device machine); the CPU suite ignores tests/gpu:

    python3 -m pytest tests/gpu/test_fast_kernels_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s
"""

from __future__ import annotations

import gc

import pytest
import torch

from tunelab.kernels import fast_blocks
from tunelab.kernels.lora_mlp import LoraMLP, lora_mlp_reference
from tunelab.kernels.lora_projection import LoraProjection, _bnb_library, dense_weight, lora_projection_reference
from tunelab.kernels.lora_qkv import LoraQKV, lora_qkv_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]
needs_liger = pytest.mark.skipif(not fast_blocks.liger_blocks_available(), reason="needs liger-kernel")
CASES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run(fn, inputs: list[torch.Tensor], grad_out: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    """Outputs and input gradients of fn(*inputs) (fresh leaves) for the given output gradients."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = grad_out if isinstance(grad_out, list) else [grad_out]
    # cloned: liger's RMSNorm writes its input gradient over the output gradient it is handed
    torch.autograd.backward(outputs, [g.to(o.dtype).clone() for o, g in zip(outputs, grads, strict=True)])
    return [o.detach() for o in outputs] + [t.grad for t in leaves if t.requires_grad]


def compare(fast: list[torch.Tensor], reference: list[torch.Tensor], tol: float, what: str) -> None:
    assert len(fast) == len(reference)
    for index, (mine, theirs) in enumerate(zip(fast, reference, strict=True)):
        assert torch.isfinite(mine).all(), (what, index)
        assert rel_err(mine, theirs) < tol, (what, index, rel_err(mine, theirs))


def fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here, in both paths
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("dtype,tol", CASES)
def test_lora_projection_equals_reference(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for tokens, features_in, features_out in [(4096, 2048, 8192), (1000, 4096, 1024)]:
        x = torch.randn(2, tokens // 2, features_in, device="cuda", generator=g).to(dtype).requires_grad_()
        base = torch.nn.Linear(features_in, features_out, bias=False, device="cuda", dtype=dtype).requires_grad_(False)
        a = (torch.randn(16, features_in, device="cuda", generator=g) / features_in**0.5).to(dtype).requires_grad_()
        b = (torch.randn(features_out, 16, device="cuda", generator=g) / 4).to(dtype).requires_grad_()
        grad = torch.randn(2, tokens // 2, features_out, device="cuda", generator=g)
        weight = base.weight.float()
        fast = run(lambda x, a, b, base=base: LoraProjection.apply(x, base, a, b, 2.0, None), [x, a, b], grad)
        reference = run(lambda x, a, b, w=weight: lora_projection_reference(x, w, a, b, 2.0), fp32([x, a, b]), grad)
        compare(fast, reference, tol, f"lora projection {dtype} {features_in}->{features_out}")


@pytest.mark.parametrize("double_quant", [True, False])
def test_lora_projection_on_4bit_weights_equals_reference(double_quant: bool) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator(device="cuda").manual_seed(1)
    dense = torch.nn.Linear(2048, 8192, bias=False, dtype=torch.bfloat16)
    base = bnb.nn.Linear4bit(2048, 8192, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(
        dense.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=double_quant
    )
    base = base.cuda()  # quantizes
    x = torch.randn(4, 1024, 2048, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    a = (torch.randn(16, 2048, device="cuda", generator=g) / 45).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(8192, 16, device="cuda", generator=g) / 4).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(4, 1024, 8192, device="cuda", generator=g)
    fast = run(lambda x, a, b: LoraProjection.apply(x, base, a, b, 2.0, None), [x, a, b], grad)
    # tunelab's dequantizations equal bitsandbytes' own function, bit for bit: the one-launch Triton kernel
    # (kernels/nf4_triton.py, the default) and the direct launch of bitsandbytes' kernels (without Triton)
    from tunelab.kernels import lora_projection, nf4_triton

    packed, state = base.weight.data, base.weight.quant_state
    theirs = bnb.functional.dequantize_4bit(packed, state)
    assert nf4_triton.supported(packed, state)
    assert torch.equal(dense_weight(base, torch.bfloat16), theirs)
    assert torch.equal(lora_projection.dequantize_nf4_reference(packed, state), theirs)
    lora_projection.TRITON_DEQUANT["on"] = False
    try:
        assert _bnb_library() is not None  # the direct path is the one under test
        assert torch.equal(dense_weight(base, torch.bfloat16), theirs)
    finally:
        lora_projection.TRITON_DEQUANT["on"] = True
    for rows, columns in [(1024, 4096), (14336, 4096), (96, 64)]:  # more shapes, the last smaller than a program
        weight = bnb.nn.Params4bit(
            torch.randn(rows, columns, dtype=torch.bfloat16) / 50, requires_grad=False, quant_type="nf4",
            compress_statistics=double_quant,
        ).cuda()  # fmt: skip
        expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        assert torch.equal(nf4_triton.dequantize(weight.data, weight.quant_state), expected), (rows, columns)
    weight = dense_weight(base, torch.float32)  # the dequantized nf4 weight: the function's own base
    reference = run(lambda x, a, b: lora_projection_reference(x, weight, a, b, 2.0), fp32([x, a, b]), grad)
    compare(fast, reference, 1e-2, "lora projection nf4")


def _mlp_operands(dtype: torch.dtype, hidden: int, inner: int, ranks: tuple[int, int, int], seed: int):  # noqa: ANN202
    g = torch.Generator(device="cuda").manual_seed(seed)
    weights = [
        torch.randn(inner, hidden, device="cuda", generator=g) / hidden**0.5,
        torch.randn(inner, hidden, device="cuda", generator=g) / hidden**0.5,
        torch.randn(hidden, inner, device="cuda", generator=g) / inner**0.5,
    ]
    adapters = []
    for (features_out, features_in), rank in zip([(inner, hidden), (inner, hidden), (hidden, inner)], ranks):  # noqa: B905
        adapters.append(torch.randn(rank, features_in, device="cuda", generator=g) / features_in**0.5)
        adapters.append(torch.randn(features_out, rank, device="cuda", generator=g) / 4)
    x = torch.randn(2, 1536, hidden, device="cuda", generator=g).to(dtype)
    grad = torch.randn(2, 1536, hidden, device="cuda", generator=g)
    return x, weights, adapters, grad


@pytest.mark.parametrize("dtype,tol", CASES)
def test_lora_mlp_equals_reference(dtype: torch.dtype, tol: float) -> None:
    """The fused LoRA MLP (Triton SwiGLU with the low-rank terms inside) against the plain formula in fp32: output,
    input gradient and all six adapter gradients; fp32 adapters as peft keeps them, one odd rank (masking)."""
    scalings = (2.0, 2.0, 0.5)
    for hidden, inner, ranks in [(2048, 8192, (16, 16, 16)), (1024, 2816, (8, 16, 12))]:
        x, weights, adapters, grad = _mlp_operands(dtype, hidden, inner, ranks, seed=5)
        bases = tuple(torch.nn.Linear(1, 1, bias=False).cuda().requires_grad_(False) for _ in weights)
        for base, weight in zip(bases, weights, strict=True):
            base.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
        leaves = [x.requires_grad_()] + [a.requires_grad_() for a in adapters]
        fast = run(lambda x, *ad, bases=bases: LoraMLP.apply(x, bases, scalings, *ad), leaves, grad)
        dense = tuple(w.to(dtype).float() for w in weights)

        def reference(x, *ad, dense=dense):  # noqa: ANN001, ANN202
            return lora_mlp_reference(x, dense, tuple(zip(ad[0::2], ad[1::2], strict=True)), scalings)

        want = run(reference, fp32(leaves), grad)
        compare(fast, want, tol, f"lora mlp {dtype} {hidden}x{inner} ranks {ranks}")
        assert all(t.dtype == torch.float32 for t in fast[2:])  # adapter gradients in the adapters' dtype


@pytest.mark.parametrize("dtype,tol", CASES)
def test_lora_qkv_equals_reference(dtype: torch.dtype, tol: float) -> None:
    """q, k, v LoRA projections as one function against the plain formula in fp32: the three outputs, the input
    gradient and the six adapter gradients, on the Llama-3.1-8B attention shapes (GQA: k, v 4x narrower)."""
    g = torch.Generator(device="cuda").manual_seed(9)
    hidden, outs, ranks, scalings = 4096, (4096, 1024, 1024), (16, 16, 8), (2.0, 2.0, 0.5)
    weights = [torch.randn(out, hidden, device="cuda", generator=g) / hidden**0.5 for out in outs]
    adapters = []
    for out, rank in zip(outs, ranks, strict=True):
        adapters.append(torch.randn(rank, hidden, device="cuda", generator=g) / hidden**0.5)
        adapters.append(torch.randn(out, rank, device="cuda", generator=g) / 4)
    x = torch.randn(2, 1024, hidden, device="cuda", generator=g).to(dtype)
    grads = [torch.randn(2, 1024, out, device="cuda", generator=g) for out in outs]
    bases = tuple(torch.nn.Linear(1, 1, bias=False).cuda().requires_grad_(False) for _ in weights)
    for base, weight in zip(bases, weights, strict=True):
        base.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    leaves = [x.requires_grad_()] + [a.requires_grad_() for a in adapters]
    fast = run(lambda x, *ad: LoraQKV.apply(x, bases, scalings, *ad), leaves, grads)
    dense = tuple(w.to(dtype).float() for w in weights)

    def reference(x, *ad):  # noqa: ANN001, ANN202
        return lora_qkv_reference(x, dense, tuple(zip(ad[0::2], ad[1::2], strict=True)), scalings)

    compare(fast, run(reference, fp32(leaves), grads), tol, f"lora qkv {dtype}")
    assert all(t.dtype == torch.float32 for t in fast[4:])  # adapter gradients in the adapters' dtype


@pytest.mark.parametrize("dtype,tol", CASES)
def test_lora_mlp_recompute_without_output_equals_reference(dtype: torch.dtype, tol: float) -> None:
    """The layer graphs' recompute (lora_mlp.output_unused: no SwiGLU forward, no down projection; backward's
    SwiGLU kernel writes h): the gradients against the plain formula in fp32, and the h the backward kernel
    writes equals the forward kernel's (the same fp32 arithmetic in the same order: equal, or within one bf16
    rounding where the compiler orders the low-rank dot differently)."""
    from tunelab.kernels import lora_mlp, lora_swiglu_triton

    scalings = (2.0, 2.0, 0.5)
    x, weights, adapters, grad = _mlp_operands(dtype, 2048, 8192, (16, 16, 16), seed=7)
    bases = tuple(torch.nn.Linear(1, 1, bias=False).cuda().requires_grad_(False) for _ in weights)
    for base, weight in zip(bases, weights, strict=True):
        base.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    leaves = [x.requires_grad_()] + [a.requires_grad_() for a in adapters]

    def recompute(x, *ad):  # noqa: ANN001, ANN202
        with lora_mlp.output_unused():
            return LoraMLP.apply(x, bases, scalings, *ad)

    fast = run(recompute, leaves, grad)[1:]  # the output is not computed
    dense = tuple(w.to(dtype).float() for w in weights)

    def reference(x, *ad):  # noqa: ANN001, ANN202
        return lora_mlp_reference(x, dense, tuple(zip(ad[0::2], ad[1::2], strict=True)), scalings)

    compare(fast, run(reference, fp32(leaves), grad)[1:], tol, f"lora mlp recompute {dtype}")
    g = torch.Generator(device="cuda").manual_seed(8)
    gate, up = (torch.randn(3000, 8192, device="cuda", generator=g).to(dtype) for _ in range(2))
    t_gu = torch.randn(3000, 32, device="cuda", generator=g).to(dtype)
    b_gate, b_up, a_down = (torch.randn(*shape, device="cuda", generator=g).to(dtype) / 4
                            for shape in ((8192, 16), (8192, 16), (16, 8192)))  # fmt: skip
    u_down = torch.randn(3000, 16, device="cuda", generator=g).to(dtype)
    h = lora_swiglu_triton.swiglu_lowrank_forward(gate, up, t_gu[:, :16], t_gu[:, 16:], b_gate, b_up)
    grad_h = torch.randn_like(gate)
    *_, stored = lora_swiglu_triton.swiglu_lowrank_backward(
        grad_h, u_down, a_down, gate.clone(), up.clone(), t_gu[:, :16], t_gu[:, 16:], b_gate, b_up, store_h=True
    )
    differing = int((stored != h).sum())
    print(f"\nh from the backward kernel: {differing} of {h.numel()} elements differ from the forward kernel's")
    assert rel_err(stored, h) < (1e-7 if dtype == torch.float32 else 1e-4), rel_err(stored, h)


def test_lora_mlp_on_4bit_weights_equals_reference() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    x, weights, adapters, grad = _mlp_operands(torch.bfloat16, 2048, 8192, (16, 16, 16), seed=6)
    bases = []
    for weight in weights:
        base = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.bfloat16)
        base.weight = bnb.nn.Params4bit(
            weight.to(torch.bfloat16).cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        bases.append(base.cuda())
    bases = tuple(bases)
    leaves = [x.requires_grad_()] + [a.requires_grad_() for a in adapters]
    fast = run(lambda x, *ad: LoraMLP.apply(x, bases, (2.0, 2.0, 2.0), *ad), leaves, grad)
    dense = tuple(dense_weight(base, torch.float32) for base in bases)

    def reference(x, *ad):  # noqa: ANN001, ANN202
        return lora_mlp_reference(x, dense, tuple(zip(ad[0::2], ad[1::2], strict=True)), (2.0, 2.0, 2.0))

    compare(fast, run(reference, fp32(leaves), grad), 1e-2, "lora mlp nf4")


def test_qlora_layers_without_grad_take_the_fused_path() -> None:
    """A checkpointed layer's forward runs under no_grad: a QLoRA model there must use the fused MLP and
    projections (it fell back to peft's per-projection path) and give the same logits as with grad; a single
    token (generation's decode step) keeps bitsandbytes' 4-bit GEMV through peft."""
    pytest.importorskip("bitsandbytes")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import sft_qlora_smoke as smoke

    from tunelab.config import load_config
    from tunelab.tasks import sft

    folder = Path("/tmp/tunelab-qlora-nograd")
    if not (folder / "config.json").exists():
        shape = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8)
        smoke.save_model_dir(folder, dict(smoke.LLAMA_32_1B, **shape, num_key_value_heads=2))
    config = load_config(
        {
            "model": {"name": str(folder), "dtype": "bf16"},
            "method": {"kind": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "target": "all-linear"},
            "data": {"train": "unused.jsonl", "max_length": 256},
        }
    )
    torch.manual_seed(0)
    model = sft.build_model(config, torch.device("cuda")).eval()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    calls = []
    originals = LoraMLP.apply, LoraProjection.apply, LoraQKV.apply

    def counting(original):  # noqa: ANN001, ANN202
        return lambda *args: calls.append(1) or original(*args)

    LoraMLP.apply, LoraProjection.apply, LoraQKV.apply = (counting(original) for original in originals)
    try:
        ids = torch.randint(0, 2000, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with_grad = model(input_ids=ids).logits.detach()
            fused_calls = len(calls)
            with torch.no_grad():
                without_grad = model(input_ids=ids).logits
                no_grad_calls = len(calls) - fused_calls
                model(input_ids=ids[:1, :1])
                single_token_calls = len(calls) - fused_calls - no_grad_calls
    finally:
        LoraMLP.apply, LoraProjection.apply, LoraQKV.apply = originals
    print(f"\nfused calls: with grad {fused_calls}, without {no_grad_calls}, one token {single_token_calls}")
    assert fused_calls == no_grad_calls == 2 * (1 + 1 + 1)  # per layer: the MLP, q/k/v together, o
    assert single_token_calls == 0
    assert rel_err(without_grad, with_grad) < 1e-3
    del model


@needs_liger
@pytest.mark.parametrize("dtype,tol", CASES)
def test_rms_norm_equals_reference(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    for shape in [(4, 2048, 2048), (3, 100, 8, 128)]:  # hidden states; Qwen3's per-head query / key norm
        x = (torch.randn(*shape, device="cuda", generator=g) * 3).to(dtype).requires_grad_()
        w = (1 + torch.randn(shape[-1], device="cuda", generator=g) / 10).to(dtype).requires_grad_()
        grad = torch.randn(*shape, device="cuda", generator=g)
        fast = run(lambda x, w: fast_blocks.fast_rms_norm(x, w, 1e-5), [x, w], grad)
        reference = run(lambda x, w: fast_blocks.rms_norm_reference(x, w, 1e-5), fp32([x, w]), grad)
        compare(fast, reference, tol, f"rms norm {dtype} {shape}")


@needs_liger
@pytest.mark.parametrize("dtype,tol", CASES)
def test_swiglu_equals_reference(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator(device="cuda").manual_seed(3)
    gate = (torch.randn(4, 2048, 8192, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
    up = torch.randn(4, 2048, 8192, device="cuda", generator=g).to(dtype).requires_grad_()
    grad = torch.randn(4, 2048, 8192, device="cuda", generator=g)
    fast = run(fast_blocks.fast_swiglu, [gate, up], grad)
    reference = run(fast_blocks.swiglu_reference, fp32([gate, up]), grad)
    compare(fast, reference, tol, f"swiglu {dtype}")


@needs_liger
@pytest.mark.parametrize("dtype,tol", CASES)
def test_rotary_equals_reference(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator(device="cuda").manual_seed(4)
    batch, seq, heads, kv_heads, dim = 2, 1024, 32, 8, 64
    # as transformers makes them: projections viewed [batch, seq, heads, dim] and transposed to [batch, heads, ...]
    q = torch.randn(batch, seq, heads, dim, device="cuda", generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, dim, device="cuda", generator=g).to(dtype).transpose(1, 2)
    positions = torch.arange(seq, device="cuda").float()
    frequencies = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    angles = torch.outer(positions, frequencies)
    angles = torch.cat((angles, angles), dim=-1)[None].expand(batch, -1, -1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grads = [torch.randn(batch, heads, seq, dim, device="cuda"), torch.randn(batch, kv_heads, seq, dim, device="cuda")]
    q.requires_grad_(), k.requires_grad_()

    # liger rotates in the storage of the transposed views it gets, as transformers hands them over
    fast = run(lambda q, k: fast_blocks.fast_rotary(q, k, cos, sin), [q, k], grads)
    reference = run(lambda q, k: fast_blocks.rotary_reference(q, k, cos.float(), sin.float()), fp32([q, k]), grads)
    compare(fast, reference, tol, f"rotary {dtype}")


# ----------------------------------------------------------------------------------------------- whole model


def train_curve(fast: bool, method: str = "lora", steps: int = 50) -> tuple[list[float], float]:
    """LoRA steps (r 16 all-linear, checkpointing, AdamW 2e-4, bf16 autocast, fused loss) on a seeded random-init
    Llama-3.2-1B shape built by tunelab's own sft.build_model, with train.fast_kernels on or off."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import sft_qlora_smoke as smoke

    from tunelab.config import load_config
    from tunelab.tasks import sft

    gc.collect()
    torch.cuda.empty_cache()
    folder = Path("/tmp/tunelab-fast-curve-1b")
    if not (folder / "config.json").exists():
        smoke.save_model_dir(folder, smoke.LLAMA_32_1B)
    config = load_config(
        {
            "model": {"name": str(folder), "dtype": "bf16", "offload_checkpoints": "auto" if fast else False},
            "method": {"kind": method, "r": 16, "alpha": 32, "dropout": 0.0, "target": "all-linear"},
            "data": {"train": "unused.jsonl", "max_length": 2048},
            "train": {"lr": 2e-4, "fast_kernels": fast},
        }
    )
    fast_blocks.ROTARY_ENABLED["on"] = fast
    calls = []
    original_apply = LoraMLP.apply

    def counting_apply(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        return original_apply(*args)

    LoraMLP.apply = counting_apply
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    model = sft.build_model(config, torch.device("cuda")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        # ids from the first 2,000 of the vocabulary: a distribution LoRA learns within 50 steps, so the curve moves
        ids = torch.randint(0, 2000, (2, 2048), generator=generator).cuda()
        labels = ids.clone()
        labels[:, :512] = -100  # a masked prompt, as in chat SFT
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sft.lm_loss_sum(model, batch, fused=True) / int((labels[:, 1:] != -100).sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated() / 2**30
    LoraMLP.apply = original_apply
    recorder = getattr(model, "_tunelab_layer_recorder", None)
    replayed = recorder.counts["replayed"] if recorder is not None else 0
    # the fast path ran every MLP through the fused function: called eagerly, or recorded into the layers' CUDA
    # graphs (train.cuda_graphs: each layer replayed from the second step on); the plain path through none
    assert (len(calls) >= 16 * steps or replayed == 16 * (steps - 1)) if fast else not calls, (len(calls), replayed)
    if fast:
        print(f"\nfused MLP calls from Python {len(calls)}, layer graph replays {replayed}")
    del model, optimizer
    fast_blocks.ROTARY_ENABLED["on"] = True
    return losses, peak


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_50_step_loss_curve_fast_equals_plain(method: str) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    plain, plain_peak = train_curve(False, method)
    fast, fast_peak = train_curve(True, method)
    worst = max(abs(a - b) / abs(b) for a, b in zip(fast, plain, strict=True))
    print(f"\n{method}: loss step 1 {plain[0]:.4f} / {fast[0]:.4f}, step 50 {plain[-1]:.4f} / {fast[-1]:.4f}")
    print(f"(plain / fast); worst relative difference a step {worst:.2e}; peak GiB {plain_peak:.2f} / {fast_peak:.2f}")
    assert plain[-1] < plain[0] - 0.5  # the curve moves, so equality says something
    assert worst < 0.01
    assert fast_peak <= plain_peak + 0.05


def test_offloaded_checkpoints_give_the_same_gradients_in_less_memory() -> None:
    """model.offload_checkpoints: the same loss and adapter gradients (up to the run-to-run noise of the attention
    backward, measured by running the plain model twice), less peak GPU memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.config import MethodConfig
    from tunelab.kernels.offload import offload_checkpoints
    from tunelab.models import adapters

    results = []
    for offload in (False, False, True):
        gc.collect()
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=32)
        with torch.device("cuda"):
            base = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=8, vocab_size=32000, use_cache=False))
        base = base.to(torch.bfloat16)
        model = adapters.apply_method(base, MethodConfig(kind="lora", r=16, alpha=32, dropout=0.0), True).train()
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
        if offload:
            assert offload_checkpoints(model) == 8
        ids = torch.randint(0, 32000, (4, 2048), generator=torch.Generator().manual_seed(1)).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.detach()), grads, (torch.cuda.max_memory_allocated() - before) / 2**30))
        del model, base, loss
    (plain_loss, plain, plain_peak), (_, again, _), (loss, grads, peak) = results
    noise = max(rel_err(again[name], plain[name]) for name in plain)
    worst = max(rel_err(grads[name], plain[name]) for name in plain)
    print(
        f"\noffload: loss {plain_loss:.5f} / {loss:.5f}; gradient difference {worst:.1e} (plain run to run "
        f"{noise:.1e}); peak above the weights {plain_peak:.2f} / {peak:.2f} GiB"
    )
    assert loss == plain_loss
    assert worst <= max(3 * noise, 1e-6)
    assert peak < plain_peak - 0.15  # 8 layers x 4 x 2048 x 2048 bf16 = 256 MiB of layer inputs moved out
