"""Offline tiny seq2seq (BART-shaped) and decoder (Llama) models, tokenizers and dialogue data for the summarize
tests. The BART tokenizer is a byte-level BPE trained in-process on the fixtures' sample text plus demo dialogues,
with BART's special tokens at BART's ids (<s>=0, <pad>=1, </s>=2, <unk>=3) and its `<s> $A </s>` post-processor."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from fixtures import SAMPLE_TEXT, save_tiny_model_dir
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

from tunelab.data.demo_dialogues import make_dialogues

BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
_CACHE: dict[str, str] = {}


def make_bart_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny BART-style tokenizer (training cached per process)."""
    if "bart" not in _CACHE:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=900,
            min_frequency=2,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in BART_SPECIALS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        corpus = [SAMPLE_TEXT] * 4 + [r["dialogue"] + "\n" + r["summary"] for r in make_dialogues(60, 7)]
        tok.train_from_iterator(corpus, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        _CACHE["bart"] = tok.to_str()
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_CACHE["bart"]),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def make_tiny_bart(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> BartForConditionalGeneration:
    """A random 2+2-layer BART sized to `tokenizer` (d_model 64), fp32."""
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    torch.manual_seed(seed)
    return BartForConditionalGeneration(config).to(torch.float32)


def save_tiny_bart_dir(path: str | Path, seed: int = 0) -> Path:
    """Tokenizer + tiny BART (safetensors) in `path`, loadable with AutoTokenizer / AutoModelForSeq2SeqLM."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_bart_tokenizer()
    tokenizer.save_pretrained(path)
    make_tiny_bart(tokenizer, seed).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_llama_dir(path: str | Path, seed: int = 0) -> Path:
    """The fixtures' chatml tokenizer + tiny Llama."""
    return save_tiny_model_dir(path, family="chatml", seed=seed)


def write_dialogues(path: str | Path, n: int, seed: int, with_summary: bool = True, languages=("en", "ko")) -> Path:
    """`n` demo dialogues as CSV (id, dialogue[, summary])."""
    path = Path(path)
    rows = make_dialogues(n, seed, languages)
    columns = ["id", "dialogue", "summary"] if with_summary else ["id", "dialogue"]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
