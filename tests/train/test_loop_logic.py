"""The loop's bookkeeping on a real tiny model: EMA arithmetic, early stopping and best/, the NaN guard, the
schedules and the no-decay parameter groups."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from fixtures import make_tiny_llama, make_tokenizer

from tunelab.config import RunConfig, TrainConfig
from tunelab.errors import RunStopped
from tunelab.tasks import sft
from tunelab.track.metrics import MetricsLog
from tunelab.track.progress import TrainProgress
from tunelab.train import checkpoint as ckpt
from tunelab.train.ema import WeightEMA
from tunelab.train.loop import train_loop
from tunelab.train.optim import lr_factor, param_groups


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer("chatml")


@pytest.fixture
def examples(tokenizer):
    conversations = [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(16)
    ]
    return sft.tokenize_conversations(conversations, tokenizer, "chat", 64)[0]


def run(tmp_path: Path, tokenizer, examples, evaluate, loss_hook=None, **train) -> tuple[dict, list[dict]]:
    config = RunConfig.model_validate(
        {"method": {"kind": "full"}, "train": {"batch_size": 4, "grad_accum": 1, **train}}
    )
    model = make_tiny_llama(tokenizer)
    job = sft.make_job(config, model, tokenizer, examples, examples, torch.device("cpu"))
    job.evaluate = evaluate
    if loss_hook is not None:
        original = job.loss_sum
        job.loss_sum = lambda m, b: loss_hook(original(m, b))
    log = MetricsLog(tmp_path / "metrics.jsonl")
    try:
        summary = train_loop(job, config, tmp_path, Accelerator(cpu=True), log, TrainProgress)
    finally:
        log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_ema_equals_hand_computed_average() -> None:
    layer = torch.nn.Linear(3, 2)
    ema = WeightEMA(layer, decay=0.9)
    expected = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        ema.update(layer)
        for n, p in layer.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    live = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with ema.applied(layer):
        for n, p in layer.named_parameters():
            assert torch.allclose(p, expected[n], atol=1e-6)
    for n, p in layer.named_parameters():
        assert torch.equal(p, live[n])  # swapped back


def test_early_stop_keeps_best_and_stops_after_patience(tmp_path, tokenizer, examples) -> None:
    scripted = iter([1.0, 0.8, 0.9, 0.95, 0.5])
    summary, records = run(
        tmp_path,
        tokenizer,
        examples,
        lambda m: {"loss": next(scripted)},
        max_steps=10,
        eval_every=1,
        save_every=100,
        early_stop={"metric": "loss", "patience": 2},
    )
    assert summary["stopped_early"] and summary["steps"] == 4
    assert summary["best"] == {"metric": "loss", "value": 0.8, "step": 2}
    assert [r["step"] for r in records if r["event"] == "early_stop"] == [4]
    assert (tmp_path / "best" / "model.safetensors").exists()
    assert [c.name for c in ckpt.list_checkpoints(tmp_path)] == ["step-000004"]  # saved on stopping


def test_max_metric_mode(tmp_path, tokenizer, examples) -> None:
    scripted = iter([0.2, 0.6, 0.4])
    summary, _ = run(
        tmp_path,
        tokenizer,
        examples,
        lambda m: {"loss": 1.0, "token_accuracy": next(scripted)},
        max_steps=3,
        eval_every=1,
        early_stop={"metric": "token_accuracy"},
    )
    assert summary["best"]["step"] == 2


def test_nan_guard_stops_before_update_and_keeps_checkpoint(tmp_path, tokenizer, examples) -> None:
    calls = {"n": 0}

    def poison(loss: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 3 else loss

    with pytest.raises(RunStopped, match="became nan at optimizer step 3"):
        run(tmp_path, tokenizer, examples, lambda m: {"loss": 1.0}, loss_hook=poison, max_steps=6, save_every=2)
    saved = ckpt.list_checkpoints(tmp_path)
    assert [c.name for c in saved] == ["step-000002"]
    weights = ckpt.load_file(str(saved[0] / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "stopped" and records[-1]["step"] == 3


def test_schedules_warm_up_then_decay() -> None:
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, total, warmup, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, total, warmup, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(55, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_factor(80, total, warmup, "constant") == 1.0


def test_no_weight_decay_on_norms_and_biases(tokenizer) -> None:
    model = make_tiny_llama(tokenizer)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    groups = param_groups(model, TrainConfig().weight_decay or 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in groups[0]["params"])
    assert {names[i] for i in decayed}.isdisjoint({"model.norm.weight", "lm_head.bias"})
    assert {names[id(p)] for p in groups[1]["params"]} >= {"model.norm.weight", "lm_head.bias"}


def test_deferred_check_names_the_first_bad_step() -> None:
    """On CUDA the loop reads losses and norms at log / eval / save points; check_pending finds the first bad one."""
    from tunelab.train.loop import NonFinite, check_pending

    good = torch.tensor(1.5)
    check_pending([(1, good, None), (2, good, torch.tensor(0.3))])  # nothing raised
    pending = [
        (4, good, torch.tensor(0.3)),
        (5, good, torch.tensor(float("inf"))),
        (6, torch.tensor(float("nan")), None),
    ]
    with pytest.raises(NonFinite) as caught:
        check_pending(pending)
    assert (caught.value.what, caught.value.step, caught.value.value) == ("gradient norm", 5, float("inf"))
