"""INT8 post-training static quantization of an image classifier for CPU inference, and its price.

torch.ao FX graph mode (x86 / fbgemm kernels): observers are inserted, the model is run on training images
(calibration: activation ranges), then converted to quantized kernels and saved as TorchScript. The quantized and
fp32 models are then compared on the validation set: accuracy, agreement of their predictions, and CPU latency.
torch.ao.quantization is deprecated in favour of torchao's pt2e flow but still ships and works in torch 2.13;
torchao is not a dependency here.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import torch

CALIBRATION_IMAGES = 256  # enough for stable activation ranges on small CNNs (PyTorch's PTQ tutorial uses ~300)
LATENCY_IMAGES = 64  # batch-1 timings per model; the median is reported


def quantize_fx(model: torch.nn.Module, calibration: list[torch.Tensor]) -> torch.jit.ScriptModule:
    """Static INT8 model calibrated on `calibration` batches (uint8 pixels), as frozen TorchScript."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization import quantize_fx as fx
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

    from tunelab.errors import UserError

    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
    torch.backends.quantized.engine = engine
    example = calibration[0][:1]
    # timm's TF-style "same" padding decides its padding from the input size in Python, which FX cannot trace:
    # those convolutions stay fp32 modules, everything around them is quantized.
    leaves = [type(m) for m in model.modules() if type(m).__name__ in ("Conv2dSame", "MaxPool2dSame", "AvgPool2dSame")]
    custom = PrepareCustomConfig().set_non_traceable_module_classes(sorted(set(leaves), key=str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of torch.ao.quantization, see the module docstring
        try:
            prepared = fx.prepare_fx(
                copy.deepcopy(model).eval(),
                get_default_qconfig_mapping(engine),
                (example,),
                prepare_custom_config=custom,
            )
        except Exception as error:  # noqa: BLE001 - tracing errors come in many types; all mean the same here
            raise UserError(
                f"INT8 export: torch.fx cannot trace this model ({type(error).__name__}: {str(error)[:200]}). "
                "Export without --int8, or use an architecture without data-dependent control flow."
            ) from None
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
            quantized = fx.convert_fx(prepared)
            return torch.jit.freeze(torch.jit.trace(quantized, example).eval())


def _accuracy_and_predictions(model: Any, batches: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, Any]:
    with torch.no_grad():
        predicted = torch.cat([model(batch).argmax(dim=1) for batch in batches])
    return float((predicted == labels).double().mean()), predicted


def _latency_ms(model: Any, images: torch.Tensor) -> float:
    """Median milliseconds per single-image call (after warm-up), on this process's CPU threads."""
    timings = []
    with torch.no_grad():
        for _ in range(5):
            model(images[:1])
        for image in images.split(1):
            started = time.perf_counter()
            model(image)
            timings.append(time.perf_counter() - started)
    return 1000 * sorted(timings)[len(timings) // 2]


def quantize_and_compare(trained: Any, data: Any, transform: Any) -> dict[str, Any]:
    """INT8 model calibrated on training images; its validation accuracy and CPU latency against fp32.

    `trained` is image_cls.TrainedModel, `data` its ImageData, `transform` the evaluation transform."""
    from tunelab.errors import UserError
    from tunelab.models.timm_models import Normalize
    from tunelab.tasks.image_cls import make_loader

    if not data.valid:
        raise UserError("--int8 compares against fp32 on the validation set, and this run has none.")
    cpu = torch.device("cpu")
    net = copy.deepcopy(trained.model).to(cpu).to(memory_format=torch.contiguous_format).eval()
    # uint8 pixels in: the normalization travels with the exported model
    fp32 = torch.nn.Sequential(Normalize(trained.data_config), net).eval()

    def batches(samples: list[Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
        loaded = list(make_loader(trained.config, samples, trained.classes, transform, cpu))
        return [b["pixels"] for b in loaded], torch.cat([b["labels"] for b in loaded])

    step = max(1, len(data.train) // CALIBRATION_IMAGES)  # spread over the classes (train is in class order)
    calibration, _ = batches(data.train[::step][:CALIBRATION_IMAGES])
    started = time.perf_counter()
    int8 = quantize_fx(fp32, calibration)
    quantize_seconds = time.perf_counter() - started
    valid, labels = batches(data.valid)
    fp32_accuracy, fp32_predicted = _accuracy_and_predictions(fp32, valid, labels)
    int8_accuracy, int8_predicted = _accuracy_and_predictions(int8, valid, labels)
    images = torch.cat(valid)[:LATENCY_IMAGES]
    fp32_ms, int8_ms = _latency_ms(fp32, images), _latency_ms(int8, images)
    return {
        "engine": torch.backends.quantized.engine,
        "calibration_images": sum(len(b) for b in calibration),
        "valid_images": len(labels),
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy": int8_accuracy,
        "accuracy_drop": fp32_accuracy - int8_accuracy,
        "agreement": float((fp32_predicted == int8_predicted).double().mean()),
        "fp32_ms_per_image": round(fp32_ms, 3),
        "int8_ms_per_image": round(int8_ms, 3),
        "speedup": round(fp32_ms / int8_ms, 3) if int8_ms > 0 else None,
        "cpu_threads": torch.get_num_threads(),
        "quantize_seconds": round(quantize_seconds, 2),
        "input": "uint8 pixels [B, 3, H, W], normalization inside the model",
        "scripted": int8,
    }


def show_report(report: dict[str, Any]) -> None:
    """The INT8 comparison as one table on the console."""
    from rich.table import Table

    from tunelab.track.progress import console

    table = Table("", "fp32", "int8", title=f"INT8 ({report['engine']}) vs fp32, {report['valid_images']} valid images")
    table.add_row("accuracy", f"{report['fp32_accuracy']:.4f}", f"{report['int8_accuracy']:.4f}")
    table.add_row(
        "CPU ms / image (batch 1)", f"{report['fp32_ms_per_image']:.2f}", f"{report['int8_ms_per_image']:.2f}"
    )
    console.print(table)
    console.print(
        f"accuracy drop {report['accuracy_drop']:+.4f}, predictions agree on {report['agreement']:.1%}, "
        f"speedup x{report['speedup']} on {report['cpu_threads']} CPU threads"
    )
