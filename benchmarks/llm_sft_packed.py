"""Real-length SFT with and without packing (issue 7, item 2): effective tokens/s (non-pad target tokens a second).

The examples are dialogue-summarization shaped like the seeds' data (seed 001: of 12,457 prompts 6.07% are longer
than 512 tokens and 0.11% longer than 1,024): prompt lengths log-normal with median 251 tokens (sigma 0.459, which
puts those two tails where the seed measured them), clipped to [32, seq - 16]; summaries log-normal with median 60
(sigma 0.4), clipped to [8, 200]; the prompt is masked (-100), the summary is the target. Random token ids.

Frameworks, each in its own process on the Llama-3.2-1B shape, LoRA r 16 on all linear layers (llm_sft.py's recipe):
- `tunelab-packed`: tunelab's sft path with `data.packing` (tunelab.data.text.pack_examples: rows of up to `seq`
  tokens, position ids restarting per example, so attention stays within each example) and its default fast path
  (on CUDA: variable-length flash attention per example, kernels/varlen_attention.py);
- `tunelab-padded`: the same model and examples, unpacked, batches padded to their longest example;
- `hf-padded`: HF + peft as the seeds' recipe builds it, padded batches.
Every framework sees the same examples in the same order; a padded step takes as many examples as a packed step
holds on average, so both run the same number of steps over (about) the same examples.

    python3 benchmarks/llm_sft_packed.py --out DIR [--examples 600 --micro 4 --warmup 3]

Needs CUDA (LLM_SFT_DEVICE=cpu with LLM_SFT_SEQ=128 is a dry run of the code on a tiny model folder, as llm_sft.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_sft as bench  # noqa: E402 - the sibling benchmark's model building and loaders

FRAMEWORKS = ("tunelab-packed", "tunelab-padded", "hf-padded")
IGNORE = -100


def dialogue_examples(count: int, vocab: int, seq: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`count` examples with seed-001-like lengths (see the module docstring): prompt masked, summary targeted."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        prompt = int(min(max(rng.lognormvariate(5.527, 0.459), 32), seq - 16))
        answer = int(min(max(rng.lognormvariate(4.094, 0.4), 8), 200, seq - prompt))
        ids = [rng.randrange(vocab) for _ in range(prompt + answer)]
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return examples


def step_batches(framework: str, examples: list[dict], micro: int, seq: int) -> list[dict[str, Any]]:
    """The batches (CPU tensors) of one framework: packed rows `micro` at a time, or padded examples."""
    from tunelab.data.text import collate, pack_examples

    packed = pack_examples(examples, seq, seed=0)
    if framework == "tunelab-packed":
        return [collate(packed[i : i + micro], pad_id=0) for i in range(0, len(packed), micro)]
    per_step = max(1, round(len(examples) / max(1, len(packed) // micro)))
    return [collate(examples[i : i + per_step], pad_id=0) for i in range(0, len(examples), per_step)]


def run(framework: str, folder: Path, examples: list[dict], micro: int, warmup: int) -> dict[str, Any]:
    """Train over all the batches of `framework`; effective tokens/s over the steps after `warmup`."""
    import torch

    from tunelab.tasks import sft

    cuda = bench.DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batches = step_batches(framework, examples, micro, bench.SEQ)
    if framework.startswith("tunelab"):
        packing = framework == "tunelab-packed"
        model, optimizer, _ = bench.load_tunelab(folder, "lora", micro, offload=True, packing=packing)

        def loss_of(batch: dict[str, Any]) -> Any:
            targets = int((batch["labels"][:, 1:] != IGNORE).sum())
            return sft.lm_loss_sum(model, batch, fused=cuda) / max(targets, 1)

    else:
        model, optimizer, _ = bench.load_hf(folder, "lora", "hf")

        def loss_of(batch: dict[str, Any]) -> Any:
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            return model(**inputs).loss

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses, targets, real, started = [], 0, 0, None
    for step, batch in enumerate(batches):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        if step >= warmup:
            targets += int((batch["labels"][:, 1:] != IGNORE).sum())
            real += int(batch["real_tokens"].sum())
        batch = {k: v.to(bench.DEVICE, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(bench.DEVICE, dtype=torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    slots = sum(int(b["input_ids"].numel()) for b in batches[warmup:])
    return {
        "framework": framework,
        "steps": len(batches),
        "timed_steps": len(batches) - warmup,
        "target_tokens_per_s": targets / seconds,
        "real_tokens_per_s": real / seconds,
        "pad_share": 1 - real / max(slots, 1),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "loss_first": float(losses[0]),
        "loss_last": float(losses[-1]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--micro", type=int, default=4, help="packed rows a step (padded: the same examples)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=bench.default_workdir())
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = args.workdir / "llama-1b"
    if args.worker:
        import tunelab  # noqa: F401 - its transformers shims first

        vocab = 128256 if bench.DEVICE == "cuda" else 200
        examples = dialogue_examples(args.examples, vocab, bench.SEQ)
        result = run(args.worker, folder, examples, args.micro, args.warmup)
        (args.out / f"{args.worker}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(json.dumps(result), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():
        bench.build_models(args.workdir, {"1b"})
    results = []
    for framework in args.frameworks.split(","):
        command = [sys.executable, __file__, "--worker", framework, "--workdir", str(args.workdir)]
        command += ["--out", str(args.out), "--examples", str(args.examples), "--micro", str(args.micro)]
        command += ["--warmup", str(args.warmup)]
        env = {**os.environ, "PYTHONPATH": f"{bench.ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run(command, env=env, check=False)
        part = args.out / f"{framework}.json"
        if part.exists():
            results.append(json.loads(part.read_text()))
    lines = ["| framework | target tok/s | real tok/s | padding | peak GiB | loss first -> last |", "|---" * 6 + "|"]
    for r in results:
        lines.append(
            f"| {r['framework']} | {r['target_tokens_per_s'] / 1000:.1f}k | {r['real_tokens_per_s'] / 1000:.1f}k | "
            f"{r['pad_share']:.0%} | {r['peak_gib']:.2f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    text = "\n".join(lines)
    (args.out / "llm_sft_packed.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
