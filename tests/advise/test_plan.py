"""`tunelab plan`: shapes counted from the real module tree, the memory model's parts, GPU presets, the
recommendation search, --apply, and its bad input. (Accuracy against measured peaks: tests/gpu/test_plan_gpu.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fixtures import make_tiny_llama, make_tokenizer

from tunelab.advise.plan import GPUS, apply_plan, find_gpu, make_plan, prompt_tokens, settings_for, warn_if_too_big
from tunelab.advise.plan_images import resized_pixels
from tunelab.advise.plan_memory import NF4_BYTES, estimate
from tunelab.advise.plan_shapes import model_shape, offloadable_embedding_params
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import UserError
from tunelab.models.adapters import apply_method

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def config_for(name: str, **sections: dict) -> object:
    base: dict = {"model": {"name": name}, "data": {"train": "x.jsonl", "max_length": 2048}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return load_config(base)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(make_tokenizer("llama3")).save_pretrained(folder, safe_serialization=True)
    return folder


def test_shape_counts_equal_the_real_model_and_peft(tiny_folder: Path) -> None:
    """Parameters and LoRA adapter sizes come from the meta-device module tree: equal to the real model's."""
    config = config_for(str(tiny_folder), method={"kind": "lora", "r": 8})
    shape = model_shape(config)
    model = make_tiny_llama(make_tokenizer("llama3"))
    assert shape.params == sum(p.numel() for p in model.parameters())
    peft_model = apply_method(model, config.method, gradient_checkpointing=False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.lora_params(8, "all-linear") == trainable
    assert shape.lora_params(8, ["q_proj", "v_proj"]) < trainable


def test_known_shapes_match_published_sizes() -> None:
    """The offline table builds the published parameter counts (Llama-3.2-1B: 1,235,814,400; 8B: 8,030,261,248)."""
    assert model_shape(config_for("meta-llama/Llama-3.2-1B")).params == 1_235_814_400
    shape = model_shape(config_for(LLAMA_8B))
    assert shape.params == 8_030_261_248
    assert shape.lora_params(16, "all-linear") == 41_943_040  # what peft reports for r 16 all-linear


def test_parts_follow_the_settings() -> None:
    shape = model_shape(config_for(LLAMA_8B))
    gpu = GPUS["H100"]
    lora = settings_for(config_for(LLAMA_8B, train={"batch_size": 2}), gpu)
    base = estimate(shape, lora)
    parts = {p.name: p.gib for p in base.parts}
    # model.offload_embedding (auto): the untied input embedding waits in CPU memory
    assert parts["weights"] == pytest.approx((shape.params - shape.offloadable_embedding_params) * 2 / 2**30)
    assert parts["trainable states"] == pytest.approx(41_943_040 * 16 / 2**30)
    assert base.parts[3].note.startswith("fused loss")  # train.fused_loss auto: on, as on CUDA
    plain = settings_for(config_for(LLAMA_8B, train={"batch_size": 2, "fused_loss": False}), gpu)
    plain_parts = {p.name: p.gib for p in estimate(shape, plain).parts}
    assert plain_parts["logits / recompute peak"] == pytest.approx(2 * 2048 * 128256 * 12 / 2**30)
    assert estimate(shape, plain).peak_allocated_gib > base.peak_allocated_gib + 2
    # without the fast path peft upcasts every non-quantized weight to fp32 (the fast path: test_qlora_fast_path_*)
    q_config = config_for(
        LLAMA_8B,
        method={"kind": "qlora"},
        train={"batch_size": 2, "fast_kernels": False},
        model={"offload_embedding": False},
    )
    qlora = estimate(shape, settings_for(q_config, gpu))
    q_weights = {p.name: p.gib for p in qlora.parts}["weights"]
    non_linear = shape.params - shape.block_linear_params
    assert q_weights == pytest.approx((shape.block_linear_params * NF4_BYTES + non_linear * 4) / 2**30)
    no_ckpt = settings_for(config_for(LLAMA_8B, model={"gradient_checkpointing": False}, train={"batch_size": 2}), gpu)
    assert estimate(shape, no_ckpt).peak_allocated_gib > base.peak_allocated_gib + 10
    half = settings_for(config_for(LLAMA_8B, train={"batch_size": 1}), gpu)
    assert estimate(shape, half).peak_allocated_gib < base.peak_allocated_gib
    fsdp = settings_for(config_for(LLAMA_8B, train={"batch_size": 2}), gpu, gpus=4)
    fsdp.strategy = "fsdp"
    sharded = {p.name: p.gib for p in estimate(shape, fsdp).parts}
    assert sharded["weights"] == pytest.approx(shape.params * 2 / 2**30 / 4)  # several processes: no offload
    assert base.total_gib > base.peak_allocated_gib  # context and slack on top


def test_recommendations_make_an_8b_fit_a_t4_and_keep_the_effective_batch() -> None:
    config = config_for(LLAMA_8B, method={"kind": "lora"}, train={"batch_size": 16, "grad_accum": 1})
    plan = make_plan(config, find_gpu("t4", None))
    assert not plan.fits
    assert plan.changes["method.kind"] == "qlora"
    batch, accum = plan.changes["train.batch_size"], plan.changes["train.grad_accum"]
    assert batch * accum == 16 and batch < 16
    assert plan.recommended is not None and plan.recommended.total_gib <= GPUS["T4"].memory_gib


def test_spare_room_grows_the_micro_batch() -> None:
    config = config_for("meta-llama/Llama-3.2-1B", train={"batch_size": 1, "grad_accum": 16})
    plan = make_plan(config, find_gpu("H200", None))
    assert plan.fits
    assert plan.changes["train.batch_size"] > 1
    assert plan.changes["train.batch_size"] * plan.changes["train.grad_accum"] == 16


def test_gpu_names_and_custom_memory() -> None:
    assert find_gpu("rtx-4090", None).name == "RTX4090"
    assert find_gpu("a100", None).name == "A100-80"
    assert not find_gpu("V100", None).bf16
    assert find_gpu(None, 48).memory_gib == 48
    with pytest.raises(UserError, match="Unknown GPU 'h300'.*H100, H200"):
        find_gpu("h300", None)


def test_cli_plan_apply_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    source = {"model": {"name": LLAMA_8B}, "data": {"train": "x.jsonl"}, "train": {"batch_size": 8, "grad_accum": 2}}
    config.write_text(yaml.safe_dump(source))
    assert main(["plan", str(config), "--gpu", "T4", "--apply"]) == 0
    written = tmp_path / "run.t4.yaml"
    patched = load_config(written)
    assert patched.method.kind == "qlora" and patched.train.batch_size * patched.train.grad_accum == 16
    assert yaml.safe_load(config.read_text()) == source  # the user's config is left as it was
    capsys.readouterr()
    assert main(["plan", str(config), "--gpu-mem", "48", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["gpu"]["memory_gib"] == 48
    assert {p["name"] for p in data["estimate"]["parts"]} >= {"weights", "trainable states", "activations kept"}


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": LLAMA_8B}, "data": {"train": "x.jsonl"}}))
    assert main(["plan", str(config), "--gpu", "GTX1080"]) == 2
    assert "Unknown GPU 'GTX1080'" in capsys.readouterr().err
    assert main(["plan", str(config)]) == 2
    assert "--gpu NAME or --gpu-mem" in capsys.readouterr().err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"model": {"name": "someone/private-model"}, "data": {"train": "x.jsonl"}}))
    assert main(["plan", str(unknown), "--gpu", "H100"]) == 2
    assert "cannot find the architecture of model.name 'someone/private-model' offline" in capsys.readouterr().err
    cls = tmp_path / "cls.yaml"
    cls.write_text(yaml.safe_dump({"task": "image_cls", "model": {"name": "resnet18"}, "data": {"train": "x"}}))
    assert main(["plan", str(cls), "--gpu", "H100"]) == 2
    assert "no memory model for task 'image_cls'" in capsys.readouterr().err


def test_train_warning_when_the_plan_says_it_will_not_fit() -> None:
    said: list[str] = []
    warn_if_too_big(config_for(LLAMA_8B), 16.0, said.append)
    assert said and "more than this GPU's 16.0 GiB" in said[0]
    said.clear()
    warn_if_too_big(config_for("meta-llama/Llama-3.2-1B", train={"batch_size": 1}), 80.0, said.append)
    assert said == []
    # the GPU's own bf16 support and the run's process count: 8B QLoRA fits 8 GiB with bf16 (norms kept in bf16,
    # fused loss), not on a GPU without bf16 (fp32 norms and embeddings) nor in 2 processes (full logits)
    qlora = config_for(LLAMA_8B, method={"kind": "qlora"}, train={"batch_size": 2})
    warn_if_too_big(qlora, 8.0, said.append)
    assert said == []
    warn_if_too_big(qlora, 8.0, said.append, bf16=False)
    assert len(said) == 1
    warn_if_too_big(qlora, 8.0, said.append, gpus=2)
    assert len(said) == 2


def test_apply_plan_writes_beside_the_config(tmp_path: Path) -> None:
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump({"model": {"name": LLAMA_8B}, "data": {"train": "x.jsonl"}}))
    plan = make_plan(load_config(config_path), find_gpu("L4", None))
    path = apply_plan(config_path, plan)
    assert path.name == "cfg.l4.yaml" and load_config(path).model.name == LLAMA_8B


def test_mcqa_plan_counts_image_tokens_and_the_projector(tmp_path: Path) -> None:
    """A Qwen2.5-VL at 448 px: 256 language-model tokens per image; the trained projector joins the adapters."""
    train = tmp_path / "train.csv"
    train.write_text("id,image,question,a,b,c,d,answer\n1,x.png,What colour is the shape?,red,blue,green,teal,a\n")
    source = {
        "task": "mcqa",
        "model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "image_size": 448},
        "data": {"train": str(train)},
        "train": {"batch_size": 2},
    }
    plan = make_plan(load_config(source), find_gpu("L4", None))
    shape = plan.shape
    assert plan.settings.image_tokens == 256
    assert 256 + 48 <= plan.settings.seq_len <= 256 + 80
    assert shape.projector_params > 0 and shape.vision_params > 0
    lora = shape.lora_params(16, "all-linear")
    assert lora == 29_933_568  # the language model's linears only, never the vision tower's
    assert plan.current.trainable_params == lora + shape.projector_params
    frozen = load_config(source | {"method": {"train_parts": {"projector": False}}})
    assert make_plan(frozen, find_gpu("L4", None)).current.trainable_params == lora
    bigger = load_config(source | {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "image_size": 896}})
    assert make_plan(bigger, find_gpu("L4", None)).settings.image_tokens == 1024


def test_shape_is_counted_while_a_zero3_config_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # under train.distributed deepspeed-zero3, accelerate registers transformers' ZeRO-3 config before the plan
    # runs; transformers then partitions and initializes every model it builds, which a meta skeleton cannot take
    import weakref

    from transformers.integrations import deepspeed as hf_deepspeed

    class Zero3:  # what transformers asks of its registered config (HfDeepSpeedConfig needs deepspeed itself)
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self) -> bool:
            return True

    registered = Zero3()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(registered))
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    shape = model_shape(config_for("meta-llama/Llama-3.2-1B"))
    assert shape.params == 1_235_814_400
    assert hf_deepspeed.is_deepspeed_zero3_enabled()  # put back for the training that follows


def test_mcqa_prompt_counts_the_system_prompt_and_only_the_prompt_columns(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    row = "1,x.png,What colour is the shape?,red,blue,green,teal,a"
    train.write_text(f"id,image,question,a,b,c,d,answer\n{row}\n")
    extra = tmp_path / "extra.csv"  # a column the prompt never shows
    extra.write_text(f"id,image,question,a,b,c,d,answer,notes\n{row},{'x' * 400}\n")
    base = {"task": "mcqa", "model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct"}}
    default = prompt_tokens(load_config(base | {"data": {"train": str(train)}}))
    assert prompt_tokens(load_config(base | {"data": {"train": str(extra)}})) == default
    none = prompt_tokens(load_config(base | {"data": {"train": str(train), "system_prompt": ""}}))
    long = prompt_tokens(load_config(base | {"data": {"train": str(train), "system_prompt": "Think. " * 50}}))
    assert none == default - 14 and long == none + 100


def test_mcqa_full_fine_tuning_counts_fp32_training(tmp_path: Path) -> None:
    # tunelab.models.vlm trains a VLM's trained weights in fp32 (AdamW on bf16 weights loses small updates)
    train = tmp_path / "train.csv"
    train.write_text("id,image,question,a,b,answer\n1,x.png,What colour?,red,blue,a\n")
    source = {"task": "mcqa", "model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct"}, "method": {"kind": "full"}}
    plan = make_plan(load_config(source | {"data": {"train": str(train)}}), find_gpu("H100", None))
    states = next(p for p in plan.current.parts if p.name == "trainable states")
    trained = plan.shape.params - plan.shape.vision_params
    assert plan.current.trainable_params == trained
    assert states.gib == pytest.approx(trained * 14 / 2**30, rel=1e-3)  # fp32 copy (+2) + gradient + moments


def test_resized_pixels_follow_the_qwen2_vl_rule() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    budget = (56 * 56, 28 * 28 * 1280)
    for height, width in [(64, 64), (448, 336), (1000, 3000), (20, 30), (4000, 4000), (449, 223)]:
        h, w = smart_resize(height, width, factor=28, min_pixels=budget[0], max_pixels=budget[1])
        assert resized_pixels(height, width, 28, budget) == h * w, (height, width)


def test_mcqa_plan_sizes_images_from_the_data_when_image_size_is_null(tmp_path: Path) -> None:
    from PIL import Image

    rows = ["id,image,question,a,b,c,d,answer"]
    for index, (width, height) in enumerate([(640, 480), (1280, 960), (320, 240)]):
        Image.new("RGB", (width, height)).save(tmp_path / f"{index}.png")
        rows.append(f"{index},{index}.png,What colour is the shape?,red,blue,green,teal,a")
    train = tmp_path / "train.csv"
    train.write_text("\n".join(rows) + "\n")
    source = {"task": "mcqa", "model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct"}, "data": {"train": str(train)}}
    plan = make_plan(load_config(source), find_gpu("H100", None))
    # the largest image, 1280 x 960, stays 1288 x 952 (multiples of 28) within the published budget: 1,564 tokens;
    # the plan's square holds at least as many pixels
    assert plan.settings.image_size == 1120 and plan.settings.image_tokens == 1600
    assert any("largest of the first 3 training images" in reason for reason in plan.reasons)
    fixed = make_plan(load_config(source | {"model": {**source["model"], "image_size": 448}}), find_gpu("H100", None))
    assert fixed.settings.image_tokens == 256 and not any("image_size is null" in r for r in fixed.reasons)
    (tmp_path / "1.png").unlink()
    (tmp_path / "0.png").unlink()
    (tmp_path / "2.png").unlink()
    unread = make_plan(load_config(source), find_gpu("H100", None))
    assert unread.settings.image_size == 448 and any("no training image could be read" in r for r in unread.reasons)


def test_the_qwen25vl_mcqa_recipe_fits_24gb_and_asks_for_qlora_on_a_t4(tmp_path: Path) -> None:
    from tunelab.recipes import recipe_text

    train = tmp_path / "train.csv"
    train.write_text("id,image,question,a,b,c,d,answer\n1,x.png,What colour is the shape?,red,blue,green,teal,a\n")
    source = yaml.safe_load(recipe_text("mcqa-qwen25vl-lora"))
    source["data"]["train"] = str(train)
    config = load_config(source)
    assert make_plan(config, find_gpu("L4", None)).fits  # what the recipe's header says
    t4 = make_plan(config, find_gpu("T4", None))
    assert not t4.fits and t4.changes.get("method.kind") == "qlora"


# ------------------------------------------------ the CUDA fast path: half norms, checkpoint and embedding offload
GIB = 2**30


def parts_of(config: object, gpu: str = "H100", gpus: int = 1, shape: object = None) -> dict:
    """{part name: (GiB, note)} of the config's estimate on `gpu`."""
    shape = shape or model_shape(config)
    return {p.name: (p.gib, p.note) for p in estimate(shape, settings_for(config, find_gpu(gpu, None), gpus)).parts}


def test_qlora_fast_path_keeps_non_quantized_weights_in_bf16() -> None:
    """keep_half_norms (kernels/fast_path.py): sft / summarize QLoRA on the bf16 fast path skips peft's fp32 upcast:
    the non-quantized params cost 2 bytes, not 4, with no bf16 head copy and a bf16 residual stream."""
    shape = model_shape(config_for(LLAMA_8B))
    non_quantized = shape.params - shape.block_linear_params
    fixed = {"offload_embedding": False, "offload_checkpoints": False}  # the other two terms apart

    def qlora(train: dict | None = None, model: dict | None = None, gpu: str = "H100", task: str = "sft") -> dict:
        source = {"model": {"name": LLAMA_8B, **fixed, **(model or {})}, "data": {"train": "x.jsonl"}}
        source |= {"task": task, "method": {"kind": "qlora"}, "train": {"batch_size": 2, **(train or {})}}
        source["data"]["max_length"] = 2048
        return parts_of(load_config(source), gpu, shape=shape)

    fast, slow = qlora(), qlora({"fast_kernels": False})
    assert (slow["weights"][0] - fast["weights"][0]) * GIB == pytest.approx(non_quantized * 2)
    assert "bf16 fast path" in fast["weights"][1] and "bf16" not in slow["weights"][1]
    assert slow["activations kept"][0] == pytest.approx(2 * fast["activations kept"][0])  # fp32 -> bf16 residual
    assert slow["logits / recompute peak"][0] > fast["logits / recompute peak"][0]  # the head's bf16 copy is gone
    assert qlora(task="summarize")["weights"] == fast["weights"]
    assert qlora({"fast_kernels": True})["weights"] == fast["weights"]
    # off: fp16 or fp32 compute, a GPU without bf16 (auto resolves to fp16), fsdp under auto
    for off in (qlora(model={"dtype": "fp16"}), qlora(gpu="T4"), qlora({"distributed": "fsdp"})):
        assert off["weights"] == slow["weights"]
    assert qlora({"distributed": "fsdp", "fast_kernels": True})["weights"] == fast["weights"]
    mcqa = load_config(
        {"task": "mcqa", "model": {"name": "x"}, "data": {"train": "x.csv"}, "method": {"kind": "qlora"}}
    )
    settings = settings_for(mcqa, GPUS["H100"])
    assert settings.fast_kernels and settings.bf16 and not settings.keep_half_norms  # mcqa keeps peft's upcast
    assert not settings.offload_embedding and not settings.offload_checkpoints


def test_shape_counts_an_offloadable_input_embedding_only_when_plain_and_untied() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models.load import meta_skeleton

    assert model_shape(config_for(LLAMA_8B)).offloadable_embedding_params == 128256 * 4096
    assert model_shape(config_for("meta-llama/Llama-3.2-1B")).offloadable_embedding_params == 0  # tied
    assert model_shape(config_for("google/gemma-2-2b")).offloadable_embedding_params == 0  # scaled subclass, tied
    small = LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    small.tie_word_embeddings = False
    with meta_skeleton():
        model = LlamaForCausalLM(small)
    assert offloadable_embedding_params(model) == small.vocab_size * 64
    model.lm_head.weight = model.model.embed_tokens.weight  # shared without the config saying so: by identity
    assert offloadable_embedding_params(model) == 0
    with meta_skeleton():
        model = LlamaForCausalLM(small)
    model.model.embed_tokens.max_norm = 1.0
    assert offloadable_embedding_params(model) == 0

    class Scaled(torch.nn.Embedding):
        pass

    with meta_skeleton():
        model = LlamaForCausalLM(small)
    model.model.embed_tokens = Scaled(small.vocab_size, 64, device="meta")
    assert offloadable_embedding_params(model) == 0


def test_embedding_offload_moves_an_untied_frozen_table_to_cpu_memory(tiny_folder: Path) -> None:
    """model.offload_embedding: the 8B's untied table (vocab x hidden x 2 bytes, 0.98 GiB) leaves the weights; not a
    tied one, not with the setting off, several processes, a trained table, or (auto) a table under 64 MiB."""
    shape = model_shape(config_for(LLAMA_8B))
    table = 128256 * 4096

    def weights(name: str = LLAMA_8B, gpus: int = 1, task: str = "sft", data: dict | None = None, **sections: dict):
        source = {"task": task, "model": {"name": name}, "data": {"train": "x.jsonl", **(data or {})}}
        for key, value in sections.items():
            source.setdefault(key, {}).update(value)
        config = load_config(source)
        return parts_of(config, gpus=gpus, shape=shape if name == LLAMA_8B else None)["weights"]

    kept = weights(model={"offload_embedding": False})
    moved = weights()
    assert (kept[0] - moved[0]) * GIB == pytest.approx(table * 2)
    assert "input embedding (0.98 GiB) in CPU memory (model.offload_embedding)" in moved[1]
    assert "CPU memory" not in kept[1]
    assert weights(model={"offload_embedding": True}) == moved
    assert weights(task="summarize") == moved
    assert (
        weights(method={"kind": "freeze"})[0]
        < weights(method={"kind": "freeze"}, model={"offload_embedding": False})[0]
    )
    for same in (
        weights(gpus=2),  # DDP keeps every parameter on the GPUs
        weights(method={"kind": "full"}),  # trained
        weights(task="summarize", data={"special_tokens": ["#Person1#"]}),  # peft wraps the table to train rows
    ):
        assert same[0] == pytest.approx(kept[0]) and "CPU memory" not in same[1]
    assert weights(method={"kind": "full"}, model={"offload_embedding": False}) == weights(method={"kind": "full"})
    # QLoRA without the fast path: the table is fp32 there, and so is what leaves
    slow = {"method": {"kind": "qlora"}, "train": {"fast_kernels": False}}
    assert (weights(**slow, model={"offload_embedding": False})[0] - weights(**slow)[0]) * GIB == pytest.approx(
        table * 4
    )
    tied = "meta-llama/Llama-3.2-1B"
    assert weights(tied) == weights(tied, model={"offload_embedding": False})
    # the tiny Llama's untied table is under 64 MiB: auto leaves it, true moves it
    tiny = str(tiny_folder)
    assert weights(tiny)[0] == weights(tiny, model={"offload_embedding": False})[0]
    assert weights(tiny, model={"offload_embedding": True})[0] < weights(tiny)[0]


def test_checkpoint_offload_keeps_two_layer_inputs_on_the_gpu(tmp_path: Path) -> None:
    """model.offload_checkpoints: with checkpointing, 2 layers' inputs on the GPU instead of all 32; not with the
    setting off, without checkpointing, for an encoder-decoder under auto, under fsdp (auto) or for mcqa."""
    shape = model_shape(config_for(LLAMA_8B))
    tokens = 2 * 2048

    def kept(**sections: dict) -> tuple[float, str]:
        sections["train"] = {"batch_size": 2, **sections.get("train", {})}
        return parts_of(config_for(LLAMA_8B, **sections), shape=shape)["activations kept"]

    offloaded = kept()
    assert offloaded[0] * GIB == pytest.approx(2 * 2 * 4096 * tokens)
    assert offloaded[1].startswith("inputs of 2 layers on the GPU, the rest in CPU memory (model.offload_checkpoints)")
    off = kept(model={"offload_checkpoints": False})
    assert off[0] * GIB == pytest.approx(32 * 2 * 4096 * tokens) and "CPU memory" not in off[1]
    assert kept(model={"offload_checkpoints": True}) == offloaded
    assert kept(train={"distributed": "fsdp"}) == off
    no_ckpt = kept(model={"gradient_checkpointing": False})
    assert no_ckpt == kept(model={"gradient_checkpointing": False, "offload_checkpoints": False})
    assert "CPU memory" not in no_ckpt[1]
    folder = tmp_path / "t5"
    folder.mkdir()
    t5 = {"model_type": "t5", "d_model": 512, "d_ff": 2048, "num_layers": 8, "num_heads": 8, "d_kv": 64}
    (folder / "config.json").write_text(json.dumps(t5 | {"vocab_size": 32128, "tie_word_embeddings": False}))

    def seq2seq(**model: object) -> tuple[float, str]:
        source = {"task": "summarize", "model": {"name": str(folder), **model}, "data": {"train": "x.jsonl"}}
        return parts_of(load_config(source))["activations kept"]

    assert "CPU memory" not in seq2seq()[1]
    assert seq2seq(offload_checkpoints=True)[0] < seq2seq()[0]
    assert "CPU memory" in seq2seq(offload_checkpoints=True)[1]


def test_fast_blocks_and_shared_adapter_inputs_shrink_the_recomputed_block() -> None:
    """The recomputed block's bytes on the fast path, worked out from what the kernels keep: liger's RMSNorm keeps
    its bf16 input (not an fp32 copy), its SwiGLU keeps gate and up (not silu(gate)) and writes their gradients in
    place (3 intermediate-width gradients instead of 6); without dropout, LoRA adapters fed one tensor save it once
    (q / k / v: the attention norm's output; gate / up: the MLP norm's; o: the attention output)."""
    shape = model_shape(config_for(LLAMA_8B))
    h, i, q = 4096, 14336, 4096
    tokens = 2 * 2048

    def peak(**sections: dict) -> float:
        sections["train"] = {"batch_size": 2, **sections.get("train", {})}
        return parts_of(config_for(LLAMA_8B, **sections), shape=shape)["logits / recompute peak"][0] * GIB

    plain = peak(train={"fast_kernels": False})
    fast = peak()
    norms_and_mlp = (2 * 4 * h - 2 * 2 * h) + (3 * 2 * i - 2 * 2 * i)  # per token: fp32 norm copies, silu(gate)
    assert plain - fast == pytest.approx(tokens * (norms_and_mlp + 3 * 2 * i))
    with_dropout = peak(method={"dropout": 0.05})
    without = peak(method={"dropout": 0.0})
    every_adapter = 3 * (3 * h + q + 2 * h + i)  # each adapter's own dropped-out bf16 copy and its 1-byte mask
    shared = 2 * (h + h + i)  # the three distinct inputs, bf16, once each
    assert with_dropout - without == pytest.approx(tokens * (every_adapter - shared))
    gemma = model_shape(config_for("google/gemma-2-9b"))  # not a family of kernels/fast_blocks.py: no fast blocks

    def gemma_peak(**train: object) -> tuple[float, str]:
        config = config_for("google/gemma-2-9b", train={"batch_size": 2, **train})
        return parts_of(config, shape=gemma)["logits / recompute peak"]

    assert gemma_peak() == gemma_peak(fast_kernels=False)


def test_qlora_kept_dequantized_weights_count_where_the_embedding_moved() -> None:
    """train.keep_dequantized (auto: QLoRA without dropout where the input embedding moved to CPU memory) holds a
    block's q, k, v, o, gate and up weights in bf16 through its backward."""
    shape = model_shape(config_for(LLAMA_8B))

    def peak(**model: object) -> float:
        config = config_for(
            LLAMA_8B, model=dict(model), method={"kind": "qlora", "dropout": 0.0}, train={"batch_size": 2}
        )
        return parts_of(config, shape=shape)["logits / recompute peak"][0] * GIB

    dense = 2 * 4096 * (2 * 4096 + 2 * 1024 + 2 * 14336)
    assert peak() - peak(offload_embedding=False) == pytest.approx(dense)
