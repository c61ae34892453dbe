"""CUDA-graph recording of checkpointed layers (kernels/graphed_layers.py), the parts a CPU can check: LoraMLP's
recompute mode (no output computed) gives the same gradients, the adapter cache can be bypassed, keyword
arguments are classified correctly, and a model routed through the recorder trains exactly as before on a CPU
(every call falls back to torch's checkpoint). The graphs themselves: tests/gpu/test_graphed_layers_gpu.py."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer
from peft import LoraConfig, get_peft_model

from tunelab.kernels import adapter_cache, graphed_layers, lora_mlp
from tunelab.kernels.lora_mlp import LoraMLP


class _Base(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def test_lora_mlp_without_its_output_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    hidden, inner, rank = 16, 40, 4
    bases = (_Base(torch.randn(inner, hidden)), _Base(torch.randn(inner, hidden)), _Base(torch.randn(hidden, inner)))
    shapes = [(inner, hidden), (inner, hidden), (hidden, inner)]
    adapters = [
        t for o, i in shapes for t in (torch.randn(rank, i).requires_grad_(), torch.randn(o, rank).requires_grad_())
    ]
    x = torch.randn(2, 5, hidden, requires_grad=True)
    grad_out = torch.randn(2, 5, hidden)
    results = []
    for unused in (False, True):
        with lora_mlp.output_unused() if unused else torch.enable_grad():
            out = LoraMLP.apply(x, bases, (2.0, 1.0, 0.5), *adapters)
        assert out.shape == (2, 5, hidden)
        torch.autograd.backward(out, grad_out)
        results.append([t.grad.clone() for t in [x, *adapters]])
        for t in [x, *adapters]:
            t.grad = None
    for plain, skipped in zip(*results, strict=True):
        torch.testing.assert_close(skipped, plain, rtol=0, atol=0)
    assert lora_mlp._OUTPUT_UNUSED[0] == 0


def test_bypassed_adapter_cache_reads_the_parameter_as_it_is() -> None:
    param = torch.nn.Parameter(torch.ones(3, 2))
    cached, _ = adapter_cache.half_copy(param, torch.bfloat16, 2.0)
    param.data.fill_(3.0)  # a write the version counter does not see: the cache keeps the old copy
    assert float(adapter_cache.half_copy(param, torch.bfloat16, 2.0)[0][0, 0]) == 2.0
    with adapter_cache.bypassed():
        fresh, fresh_t = adapter_cache.half_copy(param, torch.bfloat16, 2.0)
        concat, _ = adapter_cache.half_concat((param, param), torch.bfloat16)
    assert float(fresh[0, 0]) == 6.0 and fresh_t.shape == (2, 3) and float(concat[5, 1]) == 3.0
    assert param._tunelab_half[1] is cached  # nothing cached while bypassed


def test_keyword_specs() -> None:
    cos = torch.zeros(1, 8, 4)
    assert graphed_layers._spec(cos)[0] == "tensor"
    assert graphed_layers._spec((cos, cos))[0] == "tensors"
    assert graphed_layers._spec(None) == ("value", None)
    assert graphed_layers._spec(False) == ("value", False)
    with pytest.raises(TypeError):
        graphed_layers._spec(torch.zeros(2, requires_grad=True))
    with pytest.raises(TypeError):
        graphed_layers._spec(object())


def test_routed_model_trains_as_before_on_a_cpu() -> None:
    tokenizer = make_tokenizer("chatml")
    base = make_tiny_llama(tokenizer)
    base.config.use_cache = False
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    plain = get_peft_model(base, lora).train()
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    routed = copy.deepcopy(plain)
    recorder = graphed_layers.install_layer_graphs(routed)
    assert recorder is not None and recorder.layers == 2
    assert graphed_layers.install_layer_graphs(routed) is None  # already routed: not wrapped twice
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (plain, routed):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(
            (float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
    assert grads[0][0] == grads[1][0]
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=0, atol=0)
    assert recorder.counts["eager"] == 2 and recorder.counts["replayed"] == 0
    assert recorder.reasons == {"not a CUDA training call": 2}


def test_auto_records_only_where_the_gpu_has_room(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    device = torch.device("cuda", 0)
    for free, expected in ((7 * gib, False), (9 * gib, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * gib))
        recorder = graphed_layers.LayerRecorder()
        recorder.require_headroom = True
        if expected:
            assert recorder._room_for_graphs(device)
        else:
            with pytest.warns(UserWarning, match="without CUDA graphs"):
                assert not recorder._room_for_graphs(device)
            assert not recorder._room_for_graphs(device)  # decided once, warned once
    forced = graphed_layers.LayerRecorder()  # train.cuda_graphs: true
    assert forced._room_for_graphs(device)


def test_collector_is_paused_while_recording_and_restored_after() -> None:
    import gc

    assert gc.isenabled()
    with graphed_layers._collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), graphed_layers._collector_paused():
        raise ValueError("a failed recording")
    assert gc.isenabled()
    gc.disable()
    try:
        with graphed_layers._collector_paused():
            pass
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_failure_description_names_the_chained_error() -> None:
    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture") from None
    except RuntimeError as error:
        assert "previous error" in graphed_layers._describe(error)
    try:
        try:
            raise OSError("cuda event destroy")
        except OSError:
            raise RuntimeError("capture invalidated")  # noqa: B904 - the implicit chain is what is under test
    except RuntimeError as error:
        text = graphed_layers._describe(error)
    assert text.startswith("RuntimeError: capture invalidated <- OSError: cuda event destroy"), text


class _Replay:
    """Stands in for a recorded CUDA graph on the CPU: replay() runs the recorded body, which (like the real
    graphs) reads and writes only the static buffers."""

    def __init__(self, body) -> None:  # noqa: ANN001
        self.body = body

    def replay(self) -> None:
        self.body()


def _simulated_layers(statics: graphed_layers._Statics, weights: list[torch.Tensor]) -> list:
    """_LayerGraphs whose "graphs" compute tanh(x W) and its input gradient from the static buffers, writing their
    results where the recorded bodies do (the output over the input, the input gradient over the incoming one)."""
    layers = []
    for weight in weights:
        graphs = object.__new__(graphed_layers._LayerGraphs)
        graphs.statics, graphs.params, graphs.needs_input_grad, graphs.slices, graphs.buffers = (
            statics, [], True, [], {}
        )  # fmt: skip

        # torch.Tensor.copy_ itself: the test counts only the copies _LayerGraphs makes around the replays
        def forward(w: torch.Tensor = weight) -> None:
            torch.Tensor.copy_(statics.out, torch.tanh(statics.hidden @ w))

        def backward(w: torch.Tensor = weight) -> None:
            y = torch.tanh(statics.hidden @ w)
            torch.Tensor.copy_(statics.grad_in, (statics.grad_out * (1 - y * y)) @ w.t())

        graphs.forward_graph, graphs.backward_graph = _Replay(forward), _Replay(backward)
        layers.append(graphs)
    return layers


@pytest.mark.parametrize("touch_between", [False, True])
def test_buffers_that_already_hold_the_input_are_not_copied_again(touch_between: bool) -> None:
    """A forward replay leaves its output in the input buffer, a backward replay its input gradient in the
    incoming-gradient buffer: the next layer skips copying them in, unless the tensor was changed in between
    (then it copies, and the results still equal plain autograd's)."""
    torch.manual_seed(0)
    weights = [torch.randn(5, 5) / 2 for _ in range(3)]
    x = torch.randn(4, 5)
    statics = graphed_layers._Statics(x, {})
    assert statics.out is statics.hidden and statics.grad_in is statics.grad_out
    layers = _simulated_layers(statics, weights)
    copies = []
    original_copy = statics.hidden.copy_
    statics.hidden.copy_ = lambda source: (copies.append("hidden"), original_copy(source))[1]
    original_grad_copy = statics.grad_out.copy_
    statics.grad_out.copy_ = lambda source: (copies.append("grad"), original_grad_copy(source))[1]

    inputs, hidden = [], x
    for graphs in layers:
        inputs.append(hidden)
        hidden = graphs.forward(hidden, {})
        if touch_between:
            hidden.mul_(0.5)  # a change the version counter sees: the buffer no longer holds these values
    grad = torch.ones_like(hidden)
    for graphs, saved in zip(reversed(layers), reversed(inputs), strict=True):
        grad, _ = graphs.backward(saved, grad, {})
        if touch_between:
            grad.mul_(0.5)

    # the last output again, after the backward replays overwrote the buffer: copied in, not taken as held
    again = layers[0].forward(hidden, {})
    torch.testing.assert_close(again, torch.tanh(hidden @ weights[0]), rtol=1e-6, atol=1e-7)

    # plain autograd on the same chain
    leaf = x.clone().requires_grad_()
    value = leaf
    for weight in weights:
        value = torch.tanh(value @ weight)
        if touch_between:
            value = value * 0.5
    torch.testing.assert_close(hidden, value.detach(), rtol=1e-6, atol=1e-7)
    value.backward(torch.ones_like(value))
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-6, atol=1e-7)
    # forward: the first input is copied in; backward: every saved input is copied in, the first incoming
    # gradient too; the others only when the tensor changed after it was handed out
    expected = 3 if touch_between else 1
    assert copies.count("hidden") == expected + 3 + 1
    assert copies.count("grad") == expected


def test_recording_uses_fresh_leaves_for_the_parameters() -> None:
    """Inside _fresh_parameter_leaves the layer computes with new leaves that share the parameters' storage (so a
    gradient accumulator a previous graph still holds, made on another stream, is never reached); the gradients
    for them are the parameters' gradients; the parameters are back in place after, also after an error."""
    tokenizer = make_tokenizer("chatml")
    model = get_peft_model(make_tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    layer = model.get_base_model().model.layers[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    before = list(layer.parameters())
    hidden = torch.randn(2, 5, 64)
    position = model.get_base_model().model.rotary_emb(hidden, torch.arange(5).unsqueeze(0))

    def loss_of(module: torch.nn.Module) -> torch.Tensor:
        return module(hidden, position_embeddings=position).float().square().sum()

    want = torch.autograd.grad(loss_of(layer), params)
    with graphed_layers._fresh_parameter_leaves(layer, params) as leaves:
        assert len(leaves) == len(params)
        assert all(a is not b and a.data_ptr() == b.data_ptr() for a, b in zip(leaves, params, strict=True))
        assert {id(p) for p in layer.parameters() if p.requires_grad} == {id(leaf) for leaf in leaves}
        got = torch.autograd.grad(loss_of(layer), leaves)
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert all(a is b for a, b in zip(layer.parameters(), before, strict=True))
    with pytest.raises(RuntimeError), graphed_layers._fresh_parameter_leaves(layer, params):
        raise RuntimeError("a failed recording")
    assert all(a is b for a, b in zip(layer.parameters(), before, strict=True))
