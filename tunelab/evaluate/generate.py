"""Batched generation: length-sorted batches; causal LMs get left padding and only their new tokens decoded,
encoder-decoder models (BART, T5) right-padded sources and their whole decoder output."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str] | list[list[int]],
    *,
    add_special_tokens: bool,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    skip_special_tokens: bool = True,
    progress: Any = None,
    accelerator: Any = None,
    synced_gpus: bool = False,
) -> list[str]:
    """Continue each prompt (text, or token ids already truncated); returns the decoded new text per prompt, in
    the prompts' order.

    Prompts are sorted by length so each batch pads little; a causal LM's padding is on the left so every row's
    last position is its real last token (what generation continues from). An encoder-decoder model reads the
    prompt with its encoder and generates from its decoder start, so its output is all new.

    accelerator: with several processes each generates every N-th of the batches one process would make (the
    same rows, padding and shapes, so the same outputs), and every process returns all outputs in order.
    synced_gpus: the model's parameters are sharded across processes (FSDP, ZeRO-3), so every forward is
    collective: processes with a batch fewer run a stand-in, and one whose rows have all ended keeps stepping
    until every process is done (transformers' synced_gpus).
    """
    from tunelab.train.distributed import gather_rows, lockstep_batches

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    encoded = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        for p in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: dict[int, str] = {}
    eos_ids = _stop_ids(model, tokenizer)
    try:
        for rows, counts in lockstep_batches(order, batch_size, accelerator):
            if not counts and not synced_gpus:
                continue  # a stand-in matters only when every forward is collective
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(device)
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                num_beams=num_beams,
                length_penalty=length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                temperature=temperature if do_sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_ids,
                **({"synced_gpus": True} if synced_gpus else {}),
            )
            if not counts:
                continue
            new_tokens = generated if encoder_decoder else generated[:, batch["input_ids"].shape[1] :]
            for row, tokens in zip(rows, new_tokens, strict=True):
                outputs[row] = tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens).strip()
            if progress is not None:
                progress(len(rows))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return gather_rows(outputs, len(prompts), accelerator)


def _stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """eos of the tokenizer and of the generation config (chat models often end turns with another token)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list):
        ids.update(config_eos)
    return sorted(ids)
