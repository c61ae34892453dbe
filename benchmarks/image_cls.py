"""GPU benchmark: tunelab image_cls against timm's own train.py, same recipe, same generated JPEG files, one machine.

Recipe (both): convnext_tiny from scratch at 224 px, batch 128, AdamW lr 5e-4 wd 0.05 (no decay on norms and
biases), cosine, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel), Mixup 0.2 / CutMix 1.0, label
smoothing 0.1, drop path 0.1, ModelEmaV3 0.9998 with warmup, bf16 autocast, channels_last, no gradient clipping,
the same number of loader workers. Reported: steady-state training images/s (median over log windows inside an
epoch, the first window of each epoch left out), peak GPU memory (torch.cuda.max_memory_allocated), and a
data-pipeline check: tunelab's loader alone, and training with the images already on the GPU.

Run on the device (see BENCHMARKS.md for the command):
    python benchmarks/image_cls.py --timm-root .bench/timm --out $OUT
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import tunelab  # noqa: F401 - before timm: tunelab._compat makes torchvision importable on CPU torch builds

WRAPPER = (
    "import atexit, runpy, sys, torch\n"
    "import tunelab  # its torchvision hook: a no-op where torchvision's extension loads\n"
    "script = sys.argv[1]; sys.argv = [script] + sys.argv[2:]\n"
    "atexit.register(lambda: print('PEAK_MEM_BYTES', torch.cuda.max_memory_allocated(), flush=True))\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def _write_image(job: tuple[str, int]) -> None:
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    # smooth colour fields plus fine noise: JPEGs of ImageNet-like size and decode cost (about 40 kB each)
    low = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((320, 256), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 20, (256, 320, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate(root: Path, classes: int, per_class: int, valid_per_class: int) -> None:
    """root/train/<class>/*.jpg and root/validation/<class>/*.jpg (timm's ImageFolder layout)."""
    jobs = []
    for split, count in (("train", per_class), ("validation", valid_per_class)):
        for c in range(classes):
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(str(folder / f"{i}.jpg"), hash((split, c, i)) % 2**31) for i in range(count)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_image, jobs, chunksize=64))


def tunelab_config(root: Path, out: Path, args: argparse.Namespace) -> Any:
    """The recipe as a tunelab RunConfig."""
    from tunelab.config import validate_config

    return validate_config(
        {
            "task": "image_cls",
            "model": {"name": args.model, "weights": "none", "image_size": args.image_size, "drop_path": 0.1},
            "data": {"train": str(root / "train"), "valid": str(root / "validation"), "num_workers": args.workers},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "grad_accum": 1,
                "lr": 5e-4,
                "weight_decay": 0.05,
                "warmup": 0.05,
                "max_grad_norm": None,
                "log_every": args.log_every,
                "eval_every": "epoch",
                "save_every": 10_000,
                "early_stop": {"metric": "ema_accuracy"},
            },
            "augment": {"ema": 0.9998},
            "eval": {"batch_size": 256},
            "output": {"dir": str(out), "overwrite": True},
        }
    )


def steady_rate(records: list[dict[str, Any]], steps_per_epoch: int, window: int) -> float:
    """Median images/s of the log windows (steps s-window+1 .. s) that do not hold an epoch's first step."""
    rates = [
        r["samples_per_s"]
        for r in records
        if (r["step"] - 1) // steps_per_epoch == (r["step"] - window - 1) // steps_per_epoch and r["step"] > window
    ]
    return statistics.median(rates)


def run_tunelab(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """tunelab image_cls on the JPEG files; throughput from metrics.jsonl, memory from summary.json."""
    from tunelab.tasks import image_cls

    out = Path("/tmp/bench_tunelab")
    started = time.time()
    image_cls.train(tunelab_config(root, out, args))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("event") == "train"]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "images_per_s": steady_rate(train, args.steps_per_epoch, args.log_every),
        "windows": [round(r["samples_per_s"], 1) for r in train],
        "peak_mem_gib": summary["peak_mem_gib"],
        "valid": summary["final"],
        "wall_s": round(time.time() - started, 1),
    }


def run_gpu_resident(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same loop, model and on-device augmentation, with the uint8 images already on the GPU (no files,
    no CPU transforms): the speed the loop reaches when loading costs nothing."""
    import torch

    from tunelab.models.load import resolve_dtype
    from tunelab.models.timm_models import create_model, resolve_data_config
    from tunelab.tasks import image_cls
    from tunelab.track.progress import TrainProgress
    from tunelab.train.loop import train_loop
    from tunelab.train.run import make_accelerator, prepare_run_dir

    config = tunelab_config(root, Path("/tmp/bench_resident"), args)
    config.data.valid = None
    config.data.valid_split = 0.0
    torch.backends.cudnn.benchmark = True
    accelerator = make_accelerator(resolve_dtype("auto", torch.device("cuda")))
    data = image_cls.load_data(config)
    net = image_cls.in_layout(create_model(config.model, len(data.classes)).cuda(), config)
    recipe = image_cls.Recipe(config, net, resolve_data_config(net, args.image_size), data)
    job = image_cls.make_job(recipe, data.train)
    n = len(data.train)
    size = args.image_size
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, len(data.classes), (n,), device="cuda")
    job.train_data, job.num_workers = list(range(n)), 0
    job.collate = lambda items: {"pixels": pixels[items], "labels": labels[items]}  # noqa: E731
    records: list[dict[str, Any]] = []
    log = type("Log", (), {"write": lambda self, r: records.append(r), "close": lambda self: None})()
    run_dir, _ = prepare_run_dir(config, resume=False)
    torch.cuda.reset_peak_memory_stats()
    summary = train_loop(job, config, run_dir, accelerator, log, TrainProgress)
    train = [r for r in records if r.get("event") == "train"]
    return {
        "images_per_s": steady_rate(train, args.steps_per_epoch, args.log_every),
        "windows": [round(r["samples_per_s"], 1) for r in train],
        "peak_mem_gib": summary["peak_mem_gib"],
    }


def loader_only(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """tunelab's training loader alone (decode + RandAugment + collate in worker processes): images/s."""
    import torch

    from tunelab.models.timm_models import create_model, resolve_data_config
    from tunelab.tasks import image_cls

    config = tunelab_config(root, Path("/tmp/bench_loader"), args)
    data = image_cls.load_data(config)
    data_config = resolve_data_config(create_model(config.model, len(data.classes)), args.image_size)
    dataset = image_cls.ImageDataset(
        data.train, {c: i for i, c in enumerate(data.classes)}, image_cls.train_transform(config, data_config), 0
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=image_cls.collate_images,
        pin_memory=True,
        prefetch_factor=4,
    )
    count, started = 0, None
    for index, batch in enumerate(loader):
        if index == 4:  # after the workers' start
            started = time.perf_counter()
        elif index > 4:
            count += len(batch["labels"])
    return {"images_per_s": count / (time.perf_counter() - started), "workers": args.workers}


def run_timm(root: Path, args: argparse.Namespace, train_py: Path) -> dict[str, Any]:
    """timm's train.py with the same flags; throughput from the arrival times of its log lines."""
    flags = [
        "--data-dir", str(root), "--model", args.model, "--num-classes", str(args.classes),
        "--img-size", str(args.image_size),
        "-b", str(args.batch_size), "--epochs", str(args.epochs), "--opt", "adamw", "--lr", "5e-4",
        "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "0", "--aa", "rand-m9-mstd0.5-inc1",
        "--reprob", "0.25", "--remode", "pixel", "--mixup", "0.2", "--cutmix", "1.0", "--smoothing", "0.1",
        "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9998", "--model-ema-warmup", "--amp",
        "--amp-dtype", "bfloat16", "--channels-last", "-j", str(args.workers), "--pin-mem",
        "--log-interval", str(args.log_every), "--output", "/tmp/bench_timm", "--experiment", "bench",
        "--val-split", "validation", "--no-prefetcher" if args.timm_no_prefetcher else "--pin-mem",
    ]  # fmt: skip
    command = [sys.executable, "-u", "-c", WRAPPER, str(train_py), *flags, *args.timm_extra.split()]
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamps: list[tuple[int, int, float]] = []
    peak, tail = None, []
    pattern = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+)")
    for line in process.stdout:  # type: ignore[union-attr]
        now = time.perf_counter()
        tail = (tail + [line.rstrip()])[-30:]
        match = pattern.search(line)
        if match:
            stamps.append((int(match.group(1)), int(match.group(2)), now))
        if line.startswith("PEAK_MEM_BYTES"):
            peak = int(line.split()[1]) / 2**30
    process.wait()
    windows = [
        (b[1] - a[1]) * args.batch_size / (b[2] - a[2])
        for a, b in zip(stamps, stamps[1:], strict=False)
        if a[0] == b[0] and a[1] > 0  # inside one epoch, the epoch's first window left out
    ]
    if process.returncode or not windows:
        raise RuntimeError(f"timm train.py failed ({process.returncode}):\n" + "\n".join(tail))
    return {
        "images_per_s": statistics.median(windows),
        "windows": [round(w, 1) for w in windows],
        "peak_mem_gib": round(peak, 3) if peak is not None else None,
        "wall_s": round(time.time() - started, 1),
        "train_py": str(train_py),
    }


def timm_script(root: Path) -> Path:
    """train.py of the installed timm's release (or the newest older one; HEAD for newer releases)."""
    import timm

    version = timm.__version__.split("+")[0]
    tags = sorted((p for p in root.iterdir() if (p / "train.py").exists()), key=lambda p: p.name)
    exact = root / f"v{version}"
    if (exact / "train.py").exists():
        return exact / "train.py"
    numbered = [p for p in tags if p.name.startswith("v")]

    def key(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.name))

    older = [p for p in numbered if key(p) <= tuple(int(x) for x in re.findall(r"\d+", version)[:3])]
    return (max(older, key=key) if older else root / "HEAD") / "train.py"


def main() -> None:
    """Generate the data, run the four measurements, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-root", type=Path, default=Path(".bench/timm"))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--data", type=Path, default=Path("/tmp/bench_images"))
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--classes", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps-per-epoch", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--timm-no-prefetcher", action="store_true")
    parser.add_argument("--timm-extra", default="", help="more train.py flags, e.g. '--device cpu' for a smoke test")
    parser.add_argument("--only", default="loader,tunelab,resident,timm")
    args = parser.parse_args()
    import timm
    import torch

    per_class = args.steps_per_epoch * args.batch_size // args.classes
    started = time.time()
    generate(args.data, args.classes, per_class, 4)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "timm_version": timm.__version__,  # not "timm": that key holds timm's run
        "images": {"train": per_class * args.classes, "valid": 4 * args.classes, "generate_s": time.time() - started},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    steps = {
        "loader": lambda: loader_only(args.data, args),
        "tunelab": lambda: run_tunelab(args.data, args),
        "resident": lambda: run_gpu_resident(args.data, args),
        "timm": lambda: run_timm(args.data, args, timm_script(args.timm_root)),
    }
    for name in args.only.split(","):
        try:
            results[name] = steps[name]()
        except Exception as error:  # noqa: BLE001 - keep the other measurements
            results[name] = {"error": f"{type(error).__name__}: {error}"[-3000:]}
        print(name, json.dumps(results[name])[:600], flush=True)
        (args.out / "image_cls_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
