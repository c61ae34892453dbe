"""image_cls: timm image classification with the full regularization stack, top to bottom.

Images come from class folders or a table of (image path, label) under an image root, are checked once (bad files
listed or skipped, bombs refused, paths confined) and split with every class in both parts. The model is a timm
model with pretrained weights and a new head. Training uses timm's pieces: create_transform with RandAugment on
the CPU side (uint8 out, as timm's prefetcher), then on the device normalization, RandomErasing, Mixup / CutMix
with label smoothing and a soft-target cross-entropy; drop path; ModelEmaV3 kept beside the raw weights, both
evaluated. Evaluation reports top-1 / top-5 / macro F1 (raw and ema_*), and at the end per-class precision /
recall and a confusion matrix. Prediction averages TTA views; export writes timm's folder layout or INT8.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.data.images import (
    ImageDataset,
    ImageSample,
    check_images,
    collate_images,
    read_image_folder,
    read_image_table,
)
from tunelab.data.splits import stratified_split
from tunelab.errors import UserError
from tunelab.evaluate.metrics import classification_report, scalar_metrics
from tunelab.models.timm_models import Normalize, check_model_name, create_model, resolve_data_config
from tunelab.track.progress import work_bar
from tunelab.train.loop import TrainingJob

MODEL_FILE, EMA_FILE, META_FILE = "model.safetensors", "ema.safetensors", "tunelab_image_model.json"

# ----------------------------------------------------------------------------------------------- data


@dataclass
class ImageData:
    """The checked samples of a run and its class names (sorted; index = class id)."""

    train: list[ImageSample]
    valid: list[ImageSample]
    classes: list[str]


def read_samples(source: str, config: RunConfig, need_label: bool, key: str) -> list[ImageSample]:
    """Samples of a class-folder tree or a table; a table's paths are confined to data.image_root (default: the
    table's folder)."""
    path = Path(source)
    if path.is_dir():
        return read_image_folder(path, key)
    if not path.is_file():
        raise UserError(f"{key} is {path}, which does not exist. Give a class-folder tree or a CSV / JSONL / Parquet.")
    root = Path(config.data.image_root) if config.data.image_root else path.parent
    if not root.is_dir():
        raise UserError(f"data.image_root {root} is not a folder. Point it at the folder that holds the images.")
    columns = config.data.columns
    return read_image_table(path, columns.image, columns.label, root, need_label, columns.id)


def load_data(config: RunConfig) -> ImageData:
    """Train and validation samples: data.valid when given, else a stratified valid_split of train. Every image
    is checked before the split, so one message lists all the unreadable ones."""
    skip, limit = config.data.skip_bad_images, config.data.max_image_pixels
    train = read_samples(str(config.data.train), config, True, "data.train")
    if config.data.limit:
        train = train[: config.data.limit]
    classes = sorted({s.label for s in train if s.label is not None})
    if len(classes) < 2:
        raise UserError(
            f"data.train has {len(classes)} class ({', '.join(classes) or 'none'}): a classifier needs at least "
            "two. Add the other classes' images (one subfolder or label value per class)."
        )
    train = check_images(train, skip, limit, "data.train")
    if config.data.valid:
        valid = read_samples(config.data.valid, config, True, "data.valid")
        require_known_labels(valid, classes, config.data.valid)
        valid = check_images(valid, skip, limit, "data.valid")
    elif config.data.valid_split > 0:
        train_ids, valid_ids = stratified_split([s.label for s in train], config.data.valid_split, config.train.seed)
        train, valid = [train[i] for i in train_ids], [train[i] for i in valid_ids]
    else:
        valid = []
    return ImageData(train, valid[: config.data.valid_limit] if config.data.valid_limit else valid, classes)


def require_known_labels(samples: list[ImageSample], classes: list[str], source: str) -> None:
    """A labeled file may only name classes the model was trained on."""
    unseen = Counter(s.label for s in samples if s.label is not None and s.label not in set(classes))
    if unseen:
        shown = ", ".join(f"'{label}' ({n} rows)" for label, n in unseen.most_common(20))
        raise UserError(
            f"{source} has labels that training never saw: {shown}. The model knows {len(classes)} classes: "
            f"{', '.join(classes[:30])}{', ...' if len(classes) > 30 else ''}. Fix the labels or retrain with them."
        )


def class_counts(samples: list[ImageSample], classes: list[str]) -> list[int]:
    """Images per class, in class order."""
    counts = Counter(s.label for s in samples)
    return [counts.get(name, 0) for name in classes]


# ----------------------------------------------------------------------------------------------- transforms


def train_transform(config: RunConfig, data_config: dict[str, Any]) -> Any:
    """timm's training transform for the model's data config; uint8 out (normalization and random erasing run
    on the device, as with timm's prefetcher)."""
    from timm.data import create_transform

    aug = config.augment
    return create_transform(
        **{**data_config, "interpolation": aug.interpolation},  # timm train.py's --train-interpolation
        is_training=True,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=aug.color_jitter or 0.0,
        auto_augment=aug.auto_augment,
        use_prefetcher=True,
    )


def eval_transform(data_config: dict[str, Any], size: int | None = None) -> Any:
    """timm's evaluation transform (resize, center crop) for the data config, optionally at another size."""
    from timm.data import create_transform

    config = dict(data_config)
    if size:
        config["input_size"] = (3, size, size)
    return create_transform(**config, is_training=False, use_prefetcher=True)


# ----------------------------------------------------------------------------------------------- training job


class Recipe:
    """The model's training state beside the loop: EMA, Mixup, random erasing, class weights, evaluation."""

    def __init__(self, config: RunConfig, net: torch.nn.Module, data_config: dict[str, Any], data: ImageData) -> None:
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from timm.utils import ModelEmaV3

        self.config, self.net, self.data_config, self.data = config, net, data_config, data
        self.device = next(net.parameters()).device
        self.normalize = Normalize(data_config).to(self.device)
        aug, num_classes = config.augment, len(data.classes)
        self.ema = ModelEmaV3(net, decay=aug.ema, use_warmup=aug.ema_warmup) if aug.ema else None
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=aug.mixup,
                cutmix_alpha=aug.cutmix,
                prob=aug.mixup_prob,
                switch_prob=aug.mixup_switch_prob,
                mode=aug.mixup_mode,
                label_smoothing=aug.label_smoothing,
                num_classes=num_classes,
            )
        self.erase = None
        if aug.re_prob > 0:
            self.erase = RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device=self.device)
        counts = class_counts(data.train, data.classes)
        self.class_weights = None
        if config.data.class_weights:  # inverse frequency, mean 1 over the training images
            inverse = torch.tensor([1.0 / max(c, 1) for c in counts], dtype=torch.float64)
            weights = inverse * len(data.train) / float((inverse * torch.tensor(counts)).sum())
            self.class_weights = weights.float().to(self.device)

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized pixels in the model's memory layout."""
        x = self.normalize(pixels)
        return in_layout(x, self.config)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed soft-target cross-entropy over the batch, after erasing and Mixup / CutMix."""
        from timm.data.mixup import mixup_target

        pixels, labels = self.normalize(batch["pixels"]), batch["labels"]
        if self.erase is not None:
            pixels = self.erase(pixels)
        if self.mixup is not None and len(labels) % 2 == 0:  # timm's Mixup pairs images: an odd last batch
            pixels, targets = self.mixup(pixels, labels)  # of an epoch trains unmixed
        else:
            targets = mixup_target(labels, len(self.data.classes), 1.0, self.config.augment.label_smoothing)
        log_probs = F.log_softmax(model(in_layout(pixels, self.config)).float(), dim=-1)
        per_image = -(targets * log_probs).sum(dim=-1)  # timm's SoftTargetCrossEntropy, kept per image
        if self.class_weights is not None:
            per_image = per_image * (targets @ self.class_weights)
        return per_image.sum()

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """Fold the new weights into the EMA."""
        if self.ema is not None:
            self.ema.update(model, step=step)

    @torch.no_grad()
    def scores(self, models: list[torch.nn.Module], samples: list[ImageSample]) -> tuple[list[torch.Tensor], Any]:
        """Logits of each model on the samples (one pass over the data), and the labels."""
        loader = make_loader(self.config, samples, self.data.classes, eval_transform(self.data_config), self.device)
        outputs: list[list[torch.Tensor]] = [[] for _ in models]
        labels = []
        for batch in loader:
            x = self.inputs(batch["pixels"].to(self.device, non_blocking=True))
            with inference_autocast(self.device):
                for out, model in zip(outputs, models, strict=True):
                    out.append(model(x).float().cpu())
            labels.append(batch["labels"])
        return [torch.cat(out) for out in outputs], torch.cat(labels)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation loss, accuracy, top-5 and macro F1 of the raw weights, and of the EMA as ema_*."""
        models = [model] + ([self.ema.module] if self.ema is not None else [])
        was_training = [m.training for m in models]
        for m in models:
            m.eval()
        logits, labels = self.scores(models, self.data.valid)
        for m, mode in zip(models, was_training, strict=True):
            m.train(mode)
        metrics: dict[str, float] = {}
        for prefix, scores in zip(("", "ema_"), logits, strict=False):
            metrics[f"{prefix}loss"] = float(F.cross_entropy(scores, labels))
            metrics.update(scalar_metrics(classification_report(scores, labels, self.data.classes), prefix))
        return metrics

    def save_weights(self, model: torch.nn.Module, folder: Path) -> None:
        """Raw weights, EMA weights and what a later process needs to rebuild the model (checkpoints, best/)."""
        from safetensors.torch import save_file

        save_file(_plain_state(model), str(folder / MODEL_FILE))
        if self.ema is not None:
            save_file(_plain_state(self.ema.module), str(folder / EMA_FILE))
        meta = {
            "model": self.config.model.name,
            "classes": self.data.classes,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            "weights": "ema" if use_ema_weights(self.config) else "raw",
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    def load_state(self, folder: Path) -> None:
        """Raw weights with their buffers (batch-norm statistics) and the EMA, for an exact resume."""
        from safetensors.torch import load_file

        self.net.load_state_dict(load_file(str(folder / MODEL_FILE), device=str(self.device)))
        if self.ema is not None and (folder / EMA_FILE).exists():
            self.ema.module.load_state_dict(load_file(str(folder / EMA_FILE), device=str(self.device)))


def make_loader(
    config: RunConfig, samples: list[ImageSample], classes: list[str], transform: Any, device: torch.device
) -> torch.utils.data.DataLoader:
    """An in-order loader of uint8 batches for evaluation and prediction."""
    index = {name: i for i, name in enumerate(classes)}
    dataset = ImageDataset(samples, index, transform, None, config.data.max_image_pixels)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.eval.batch_size,
        num_workers=num_workers(config, device),
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )


def inference_autocast(device: torch.device) -> Any:
    """bf16 autocast on GPUs that have it, fp16 on older ones, none on a CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")


def in_layout(item: Any, config: RunConfig) -> Any:
    """A tensor or model in channels_last when model.channels_last and on CUDA (on CPUs it measured slower)."""
    if not (config.model.channels_last and torch.cuda.is_available()):
        return item
    if isinstance(item, torch.Tensor):
        return item.contiguous(memory_format=torch.channels_last)
    return item.to(memory_format=torch.channels_last)


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def use_ema_weights(config: RunConfig) -> bool:
    """best/ is judged on the EMA when the early-stop metric is an ema_* metric; predictions then use it."""
    return config.augment.ema is not None and config.train.early_stop.metric.startswith("ema_")


def num_workers(config: RunConfig, device: torch.device) -> int:
    """Loader processes: data.num_workers, or min(8, CPUs - 1) on CUDA and 0 on a CPU (whose cores train)."""
    import os

    if config.data.num_workers is not None:
        return config.data.num_workers
    return min(8, max((os.cpu_count() or 1) - 1, 0)) if device.type == "cuda" else 0


def make_job(recipe: Recipe, train_samples: list[ImageSample]) -> TrainingJob:
    """The TrainingJob for image_cls: seeded per-image augmentation, optional balanced sampling."""
    config = recipe.config
    dataset = ImageDataset(
        train_samples,
        {name: i for i, name in enumerate(recipe.data.classes)},
        train_transform(config, recipe.data_config),
        config.train.seed,
        config.data.max_image_pixels,
    )
    weights = None
    if config.data.sampler == "balanced":
        counts = dict(zip(recipe.data.classes, class_counts(train_samples, recipe.data.classes), strict=True))
        weights = [1.0 / counts[s.label] for s in train_samples]
    return TrainingJob(
        model=recipe.net,
        train_data=dataset,
        collate=collate_images,
        targets_in=lambda batch: len(batch["labels"]),
        loss_sum=recipe.loss_sum,
        evaluate=recipe.evaluate if recipe.data.valid else None,
        save_weights=recipe.save_weights,
        units_in=lambda batch: len(batch["labels"]),
        unit="samples",
        sample_weights=weights,
        after_step=recipe.after_step,
        num_workers=num_workers(config, recipe.device),
    )


# ----------------------------------------------------------------------------------------------- verbs


def preflight(config: RunConfig, resume: bool) -> None:
    """Checks that cost nothing and must fail before any work: the run folder, the data paths, settings that
    do not combine, the model name."""
    from tunelab.train.run import check_run_folder, configure_cuda_allocator

    configure_cuda_allocator()
    check_run_folder(config, resume)
    if not config.data.train:
        raise UserError("data.train is not set. Point it at a folder with one subfolder per class, or a CSV.")
    for key in ("train", "valid"):
        value = getattr(config.data, key)
        if value and not Path(value).exists():
            raise UserError(f"data.{key} is {value}, which does not exist (looked for {Path(value).absolute()}).")
    if config.train.ema is not None:
        raise UserError(
            "train.ema is the generic EMA that replaces the weights at evaluation; image_cls keeps timm's "
            "ModelEmaV3 beside the raw weights instead: set augment.ema (e.g. 0.9998) and train.ema=null."
        )
    mixing = config.augment.mixup > 0 or config.augment.cutmix > 0
    if mixing and config.train.batch_size % 2:
        raise UserError(
            f"Mixup / CutMix pair the images of a batch, so train.batch_size must be even (it is "
            f"{config.train.batch_size}). Change it, or turn them off with augment.mixup=0 augment.cutmix=0."
        )
    check_model_name(config.model.name)


def show_data(data: ImageData) -> None:
    """Counts per split, and the imbalance ratio (largest class / smallest) with a hint when it is large."""
    from tunelab.track.progress import console

    counts = class_counts(data.train, data.classes)
    ratio = max(counts) / max(min(counts), 1)
    console.print(
        f"[bold]data[/]: {len(data.train)} train / {len(data.valid)} valid images, {len(data.classes)} classes; "
        f"imbalance ratio {ratio:.1f} (largest class {max(counts)}, smallest {min(counts)})"
    )
    if ratio >= 3:
        console.print("  imbalanced: consider data.sampler=balanced or data.class_weights=true")


def train(config: RunConfig, resume: bool = False) -> Path:
    """Train a run end to end and return its folder. Data and model problems surface before the folder is made."""
    from accelerate.utils import set_seed

    from tunelab.models.load import resolve_dtype
    from tunelab.track.progress import TrainProgress, console
    from tunelab.train.loop import train_loop
    from tunelab.train.run import finish_run, make_accelerator, open_run

    started = time.time()
    preflight(config, resume)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    accelerator = make_accelerator(resolve_dtype(config.model.dtype, device), config)
    torch.backends.cudnn.benchmark = True  # fixed input size: find the fastest kernels once (as timm train.py)
    set_seed(config.train.seed)
    data = load_data(config)
    show_data(data)
    net = create_model(config.model, len(data.classes)).to(accelerator.device)
    net = in_layout(net, config)
    data_config = resolve_data_config(net, config.model.image_size)
    recipe = Recipe(config, net, data_config, data)
    if config.model.compile:
        net.compile()  # in place: parameter names (and so checkpoints) stay those of the plain model
    console.print(
        f"model {config.model.name}: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, input "
        f"{data_config['input_size'][1]} px, mixed precision {accelerator.mixed_precision}, device {device.type}"
    )
    run_dir, resume_from, log = open_run(config, resume, accelerator)
    if accelerator.is_main_process:
        (run_dir / "classes.json").write_text(json.dumps(data.classes, indent=2), encoding="utf-8")
    if resume_from is not None:
        recipe.load_state(resume_from)
        console.print(f"resuming from {resume_from}")
    else:
        counts = dict(zip(data.classes, class_counts(data.train, data.classes), strict=True))
        log.write({"event": "start", "step": 0, "task": "image_cls", "model": config.model.name, "classes": counts})
    job = make_job(recipe, data.train)
    try:
        summary = train_loop(job, config, run_dir, accelerator, log, TrainProgress, resume_from)
    finally:
        log.close()
    if not accelerator.is_main_process:
        return run_dir
    final = final_report(run_dir, recipe) if data.valid and (run_dir / "best").exists() else {}
    status = "early_stopped" if summary["stopped_early"] else "completed"
    finish_run(run_dir, {"task": "image_cls", "status": status, **summary}, started, {"valid": final})
    return run_dir


def final_report(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """The best weights on the validation set: metrics, per-class precision / recall, confusion_matrix.png."""
    from safetensors.torch import load_file

    from tunelab.track.plots import plot_confusion_matrix

    best = run_dir / "best"
    weights = EMA_FILE if use_ema_weights(recipe.config) else MODEL_FILE
    model = _fresh_model(recipe.config, len(recipe.data.classes)).to(recipe.device)
    model.load_state_dict(load_file(str(best / weights), device=str(recipe.device)))
    (logits,), labels = recipe.scores([model.eval()], recipe.data.valid)
    report = classification_report(logits, labels, recipe.data.classes)
    title = f"{recipe.config.model.name} ({weights.split('.')[0]}), valid accuracy {report['accuracy']:.4f}"
    plot_confusion_matrix(report["confusion_matrix"], recipe.data.classes, run_dir / "confusion_matrix.png", title)
    return report


def _fresh_model(config: RunConfig, num_classes: int) -> torch.nn.Module:
    model = create_model(config.model.model_copy(update={"weights": "none"}), num_classes)
    return in_layout(model, config)


@dataclass
class TrainedModel:
    """A finished run's best model, ready for inference on this machine."""

    config: RunConfig
    model: torch.nn.Module
    classes: list[str]
    data_config: dict[str, Any]
    device: torch.device


def load_trained(run_dir: Path) -> TrainedModel:
    """The run's best weights (EMA or raw, as best/ was judged), in eval mode."""
    from safetensors.torch import load_file

    from tunelab.config import load_config

    run_dir, best = Path(run_dir), Path(run_dir) / "best"
    if not (best / META_FILE).exists():
        raise UserError(f"{run_dir} has no best/ weights yet (no evaluation finished). Resume it with --resume.")
    config = load_config(run_dir / "config.yaml")
    meta = json.loads((best / META_FILE).read_text(encoding="utf-8"))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = _fresh_model(config, len(meta["classes"])).to(device)
    weights = EMA_FILE if meta["weights"] == "ema" else MODEL_FILE
    model.load_state_dict(load_file(str(best / weights), device=str(device)))
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
    return TrainedModel(config, model.eval(), meta["classes"], data_config, device)


def tta_scales(config: RunConfig) -> list[float]:
    """The input scales TTA scores at (one pass over the images each): eval.tta_scales, or just 1."""
    return list(config.eval.tta_scales) if config.eval.tta else [1.0]


def tta_scores(trained: TrainedModel, samples: list[ImageSample], progress: Any = None) -> torch.Tensor:
    """Mean class probabilities over the TTA views (eval.tta: flips when training flipped, eval.tta_scales).
    `progress(n)`: told of every batch of images scored (a bar outside training)."""
    from tunelab.evaluate.tta import tta_probabilities

    config, size = trained.config, trained.data_config["input_size"][1]
    scales = tta_scales(config)
    normalize = Normalize(trained.data_config).to(trained.device)

    def one_pass(scale: float) -> Any:  # (positions, pixels) batches at one input size
        transform = eval_transform(trained.data_config, round(size * scale))
        start = 0
        for batch in make_loader(config, samples, trained.classes, transform, trained.device):
            pixels = in_layout(normalize(batch["pixels"].to(trained.device)), config)
            yield torch.arange(start, start + len(pixels)), pixels
            start += len(pixels)
            if progress is not None:
                progress(len(pixels))

    def predict(pixels: torch.Tensor) -> torch.Tensor:
        with inference_autocast(trained.device):
            return trained.model(pixels)

    with torch.no_grad():
        flip = config.eval.tta and config.augment.hflip > 0
        return tta_probabilities(predict, (one_pass(scale) for scale in scales), len(samples), flip)


def evaluate_run(run_dir: Path, data_file: str | None = None) -> dict[str, Any]:
    """Metrics of the best weights (with TTA when eval.tta) on the validation split or a labeled file."""
    trained = load_trained(run_dir)
    if data_file:
        samples = read_samples(data_file, trained.config, True, "--data")
        require_known_labels(samples, trained.classes, data_file)
        samples = check_images(samples, False, trained.config.data.max_image_pixels, data_file)
    else:
        samples = load_data(trained.config).valid
        if not samples:
            raise UserError(f"{run_dir} has no validation split (data.valid_split is 0). Pass --data FILE.")
    with work_bar("eval", len(samples) * len(tta_scales(trained.config)), "images") as advance:
        probabilities = tta_scores(trained, samples, advance)
    index = {name: i for i, name in enumerate(trained.classes)}
    labels = torch.tensor([index[s.label] for s in samples])
    report = classification_report(probabilities, labels, trained.classes)
    return {"loss": float(F.nll_loss(probabilities.clamp(min=1e-12).log(), labels)), **report}


def predict_run(run_dir: Path, data_file: str, out: Path) -> Path:
    """`id,label` and one probability column per class for every image of `data_file` (a table or a folder)."""
    import pandas as pd

    trained = load_trained(run_dir)
    path = Path(data_file)
    if path.is_dir():
        from tunelab.data.images import IMAGE_SUFFIXES

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        samples = [ImageSample(p.resolve(), None, str(p.relative_to(path))) for p in files]
    else:
        samples = read_samples(data_file, trained.config, False, "--data")
        require_known_labels(samples, trained.classes, data_file)
    if not samples:
        raise UserError(f"--data {data_file} holds no images to predict.")
    samples = check_images(samples, False, trained.config.data.max_image_pixels, data_file)
    with work_bar("predict", len(samples) * len(tta_scales(trained.config)), "images") as advance:
        probabilities = tta_scores(trained, samples, advance)
    table = pd.DataFrame({"id": [s.id for s in samples]})
    table["label"] = [trained.classes[i] for i in probabilities.argmax(dim=1).tolist()]
    for i, name in enumerate(trained.classes):
        table[f"prob_{name}"] = probabilities[:, i].numpy().round(6)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out)
    return out


def export_run(run_dir: Path, out: Path, merge: bool = False, int8: bool = False) -> Path:
    """The best model in timm's folder layout (config.json + model.safetensors, loadable with
    timm.create_model('local-dir:OUT')); with int8, also a post-training-quantized INT8 TorchScript model
    and its accuracy / CPU latency against fp32 on the validation set (int8_report.json)."""
    from timm.models import save_for_hf

    from tunelab.train.checkpoint import replace_folder

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"Export folder {out} exists and is not empty. Choose a new folder or remove it.")
    trained = load_trained(run_dir)
    model = trained.model.to("cpu").to(memory_format=torch.contiguous_format)
    report = None
    if int8:
        from tunelab.models.quantize import quantize_and_compare

        data = load_data(trained.config)
        report = quantize_and_compare(trained, data, eval_transform(trained.data_config))

    def write(folder: Path) -> None:
        save_for_hf(
            model,
            str(folder),
            model_config={"label_names": trained.classes},
            safe_serialization=True,
            data_config=trained.data_config,
        )
        if report is not None:
            torch.jit.save(report.pop("scripted"), str(folder / "model_int8.pt"))
            (folder / "int8_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")

    if out.exists():
        out.rmdir()
    replace_folder(out, write)
    if report is not None:
        from tunelab.models.quantize import show_report

        show_report(report)
    return out
