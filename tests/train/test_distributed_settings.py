"""train.distributed without launching processes: the DeepSpeed config generated from the YAML, the settings that
cannot run (exit 2 before any work, naming the key and the fix), the evaluation batches each process takes, and
the decoder blocks FSDP wraps."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fixtures import make_tiny_llama, make_tokenizer, write_chat_data

from tunelab.cli import main
from tunelab.config import RunConfig, load_config
from tunelab.errors import UserError
from tunelab.train.distributed import (
    check_distributed,
    decoder_block_classes,
    deepspeed_config,
    lockstep_batches,
    size_buckets,
)


def run_config(**train: object) -> RunConfig:
    return RunConfig.model_validate({"train": train})


def test_deepspeed_config_follows_the_yaml() -> None:
    train = run_config(distributed="deepspeed-zero3", batch_size=3, grad_accum=4, max_grad_norm=0.5).train
    config = deepspeed_config(train, "bf16", processes=2)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 2  # DeepSpeed checks micro x accumulation x processes
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in config["zero_optimization"]
    assert config["bf16"] == {"enabled": True} and not config["fp16"]["enabled"]
    assert config["zero_allow_untested_optimizer"]  # tunelab's AdamW is the client optimizer
    assert "optimizer" not in config and "scheduler" not in config  # both stay tunelab's


def test_deepspeed_config_zero2_offload_fp16_no_clipping() -> None:
    train = run_config(distributed="deepspeed-zero2", cpu_offload=True, max_grad_norm=None).train
    config = deepspeed_config(train, "fp16", processes=4)
    zero = config["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero  # ZeRO-2 keeps whole weights on each GPU
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's "off"
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert not config["zero_force_ds_cpu_optimizer"]  # torch's AdamW on the CPU partitions: nothing to compile
    zero3 = deepspeed_config(run_config(distributed="deepspeed-zero3", cpu_offload=True).train, "bf16", 2)
    assert zero3["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_deepspeed_buckets_follow_the_hidden_size() -> None:
    model = make_tiny_llama(make_tokenizer("chatml"))  # hidden 64
    config = deepspeed_config(run_config(distributed="deepspeed-zero3").train, "bf16", 2)
    size_buckets(config, model)
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640


@pytest.mark.parametrize(
    ("settings", "needles"),
    [
        ({"train": {"distributed": "deepspeed-zero3"}}, ["train.distributed", "CUDA", "ddp"]),
        ({"train": {"distributed": "deepspeed-zero2"}}, ["train.distributed", "CUDA"]),
        ({"task": "image_cls", "train": {"distributed": "fsdp"}}, ["train.distributed fsdp", "image_cls", "ddp"]),
        ({"task": "mcqa", "train": {"distributed": "fsdp"}}, ["train.distributed fsdp", "mcqa", "ddp"]),
        ({"train": {"cpu_offload": True}}, ["train.cpu_offload", "fsdp"]),
    ],
)
def test_settings_that_cannot_run(settings: dict, needles: list[str]) -> None:
    with pytest.raises(UserError) as error:
        check_distributed(RunConfig.model_validate(settings), processes=2)
    for needle in needles:
        assert needle in str(error.value)


def test_unknown_strategy_lists_the_choices() -> None:
    with pytest.raises(UserError) as error:
        load_config({"train": {"distributed": "zero3"}})
    assert "train.distributed" in str(error.value) and "deepspeed-zero3" in str(error.value)


def test_deepspeed_on_a_cpu_exits_2_before_launching(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_chat_data(tmp_path / "chat.jsonl", 8)
    path = tmp_path / "run.yaml"
    body = {"data": {"train": str(tmp_path / "chat.jsonl")}, "output": {"dir": str(tmp_path / "run")}}
    path.write_text(yaml.safe_dump(body))
    code = main(["train", str(path), "train.distributed=deepspeed-zero3", "--gpus", "2"])
    text = " ".join(capsys.readouterr().err.split())
    assert code == 2, text
    assert "deepspeed-zero3" in text and "CUDA" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()


def test_every_evaluation_batch_once_and_as_many_batches_per_process() -> None:
    order = list(range(23))
    one = lockstep_batches(order, 4)
    assert [rows for rows, _ in one] == [order[i : i + 4] for i in range(0, 23, 4)]  # 6 batches
    shares = [lockstep_batches(order, 4, SimpleNamespace(num_processes=4, process_index=r)) for r in range(4)]
    assert {len(share) for share in shares} == {2}  # 6 batches over 4 processes: 2 each, 2 of them stand-ins
    counted = sorted(tuple(rows) for share in shares for rows, counts in share if counts)
    assert counted == sorted(tuple(rows) for rows, _ in one)  # the same batches as one process makes, once each
    assert sum(not counts for share in shares for _, counts in share) == 2
    assert lockstep_batches([], 4, SimpleNamespace(num_processes=2, process_index=1)) == []


def test_fsdp_wraps_the_decoder_layers() -> None:
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(make_tokenizer("chatml"))
    assert {c.__name__ for c in decoder_block_classes(model)} == {"LlamaDecoderLayer"}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert {c.__name__ for c in decoder_block_classes(peft_model)} == {"LlamaDecoderLayer"}


def test_an_error_of_another_process_alone_reaches_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torchrun stops rank 0 when rank 1 fails alone; rank 1's message (rank 1 prints nothing itself) is left in the
    launcher's folder and printed by the launcher, once."""
    from tunelab.cli import RANK_ERRORS_ENV, _print_other_ranks_error

    folder = tmp_path / "ranks"
    folder.mkdir()
    monkeypatch.setenv(RANK_ERRORS_ENV, str(folder))
    monkeypatch.setenv("RANK", "1")
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == ""  # a non-zero rank is quiet
    assert "missing.yaml" in (folder / "rank-1.txt").read_text()
    _print_other_ranks_error(folder)
    printed = capsys.readouterr().err
    assert printed.startswith("error (process 1):") and "missing.yaml" in printed
    # when rank 0 failed too, it printed its own message and the launcher adds nothing
    monkeypatch.setenv("RANK", "0")
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    capsys.readouterr()
    _print_other_ranks_error(folder)
    assert capsys.readouterr().err == ""
