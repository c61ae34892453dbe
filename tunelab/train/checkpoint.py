"""Checkpoints that are complete or absent: written under a temporary name, then renamed.

A checkpoint folder `checkpoints/step-NNNNNN/` holds the trainable weights (`trainable.safetensors`; peft methods
also get the standard adapter files), `state.pt` (optimizer, scheduler, RNG states, EMA) and
`trainer_state.json` (step, epoch, position in the data order, best metric, early-stopping count).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (shared tensors once), as contiguous CPU tensors."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters into the model, refusing a checkpoint of another shape."""
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise RuntimeError(f"checkpoint has parameters this model lacks, first: {missing[0]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def rng_state() -> dict[str, Any]:
    """Every RNG a step can draw from: Python, NumPy, torch CPU and CUDA."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state captured."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_folder(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place."""
    return Path(run_dir) / CHECKPOINTS / f"{TMP_PREFIX}{PREFIX}{step:06d}"


def fresh_folder(folder: Path) -> Path:
    """An empty folder (what a killed save left there is removed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def gather_rng_states() -> list[torch.Tensor]:
    """Every process's rng_state, each serialized into a uint8 tensor (collective; the list on every process).
    Serialized because all_gather_object cannot unpickle the CPU generator's tensors in some torch releases, and
    state.pt is read with weights_only=True, which takes tensors but not arbitrary bytes."""
    import io

    from accelerate.utils import gather_object

    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    return [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in gather_object([buffer.getvalue()])]


def unpack_rng_state(packed: torch.Tensor) -> dict[str, Any]:
    """An rng_state from gather_rng_states' tensor."""
    import io

    return torch.load(io.BytesIO(packed.numpy().tobytes()), weights_only=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    save_extra: Callable[[Path], None] | None,
    keep_last: int,
    weights: dict[str, torch.Tensor] | None = None,
    fresh: bool = True,
) -> Path:
    """Write a complete checkpoint atomically and prune to the last `keep_last`.

    `weights`: the trainable tensors when the model cannot give them itself (gathered from shards); `fresh=False`
    keeps what other processes already wrote into the temporary folder (DeepSpeed's optimizer shards)."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = temporary_folder(run_dir, step)
    if fresh:
        fresh_folder(tmp)
    save_file(trainable_state(model) if weights is None else weights, str(tmp / "trainable.safetensors"))
    torch.save({**training_state, "rng": rng_state()}, tmp / "state.pt")
    if save_extra is not None:
        save_extra(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    if final.exists():  # the same step saved again (e.g. an end-of-run save right after a periodic one)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def clean_partial(run_dir: Path) -> None:
    """Remove temporary folders left by a save that was killed midway."""
    root = Path(run_dir) / CHECKPOINTS
    if root.exists():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path, model: torch.nn.Module, load_weights: Callable[[dict[str, torch.Tensor]], None] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load trainable weights into the model (through `load_weights` when given, e.g. into shards); return
    (training_state, trainer_state). RNG is not restored here: the loop does that last, right before training
    continues."""
    weights = load_file(str(path / "trainable.safetensors"))
    if load_weights is None:
        load_trainable_state(model, weights)
    else:
        load_weights(weights)
    training_state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return training_state, trainer_state


def replace_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name and swap it in, so `target` is always whole (used for best/)."""
    tmp = target.with_name(TMP_PREFIX + target.name)
    old = target.with_name(TMP_PREFIX + target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
