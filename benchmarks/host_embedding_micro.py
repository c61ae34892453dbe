"""What the input embedding in host memory costs a step (model.offload_embedding, kernels/host_embedding.py): the
GPU's zero-copy gather of a batch's rows from a pinned Llama-3.1-8B-sized table (128256 x 4096 bf16) against
F.embedding on a table in GPU memory, for the benchmark rows' token counts. Prints milliseconds a call and GB/s
of rows read.

    python3 benchmarks/host_embedding_micro.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tunelab  # noqa: E402,F401  (before transformers, as elsewhere)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from tunelab.kernels.host_embedding import gather_rows

    vocab, hidden = 128256, 4096
    device = torch.device("cuda")
    table_gpu = torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16)
    table_host = torch.empty(vocab, hidden, dtype=torch.bfloat16, pin_memory=True)
    table_host.copy_(table_gpu)
    print(torch.cuda.get_device_name())
    for tokens in (4096, 8192, 16384):
        ids = torch.randint(0, vocab, (tokens,), device=device)
        assert torch.equal(gather_rows(table_host, ids, device), F.embedding(ids, table_gpu))
        results = {}
        for name, call in (("gpu table", lambda i=ids: F.embedding(i, table_gpu)),
                           ("host table", lambda i=ids: gather_rows(table_host, i, device))):  # fmt: skip
            for _ in range(3):
                call()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(20):
                call()
            end.record()
            torch.cuda.synchronize()
            results[name] = start.elapsed_time(end) / 20
        moved = tokens * hidden * 2
        cells = ", ".join(f"{name} {ms:.3f} ms ({moved / ms / 1e6:.1f} GB/s)" for name, ms in results.items())
        print(f"{tokens} tokens: {cells}")


if __name__ == "__main__":
    main()
