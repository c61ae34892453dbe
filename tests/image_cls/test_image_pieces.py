"""The timm pieces as image_cls wires them: transforms, Mixup targets, EMA, TTA, metrics, splits, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from timm.data.mixup import Mixup

from tunelab.config import validate_config
from tunelab.data.images import ImageDataset, ImageSample
from tunelab.data.splits import stratified_split
from tunelab.evaluate.metrics import classification_report
from tunelab.evaluate.tta import tta_probabilities
from tunelab.models.timm_models import resolve_data_config
from tunelab.tasks import image_cls
from tunelab.train.loop import epoch_batches


def test_transforms_are_what_timm_resolves_for_the_model() -> None:
    config = validate_config({"task": "image_cls", "model": {"name": "test_efficientnet", "weights": "none"}})
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    data_config = resolve_data_config(model, None)
    assert data_config == resolve_model_data_config(model)  # size, mean, std, crop from the model itself
    expected_train = create_transform(
        **{**resolve_model_data_config(model), "interpolation": "random"},
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        hflip=0.5,
        scale=(0.08, 1.0),
        use_prefetcher=True,  # normalization and random erasing run on the device, as timm's prefetcher does
    )
    assert repr(image_cls.train_transform(config, data_config)) == repr(expected_train)
    expected_eval = create_transform(**resolve_model_data_config(model), is_training=False, use_prefetcher=True)
    assert repr(image_cls.eval_transform(data_config)) == repr(expected_eval)
    sized = resolve_data_config(model, 48)
    assert sized["input_size"] == (3, 48, 48) and sized["mean"] == data_config["mean"]


def test_mixup_targets_sum_to_one() -> None:
    mixup = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    np.random.seed(0)
    for _ in range(6):  # both mixup and cutmix batches (switch_prob 0.5)
        pixels, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
        _, targets = mixup(pixels, labels)
        assert targets.shape == (8, 5)
        assert torch.allclose(targets.sum(dim=1), torch.ones(8))
        assert (targets >= 0).all()


def test_ema_is_the_hand_computed_average(tmp_path: Path) -> None:
    config = validate_config(
        {"task": "image_cls", "augment": {"ema": 0.7, "ema_warmup": False, "mixup": 0, "cutmix": 0}}
    )
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    data = image_cls.ImageData([ImageSample(tmp_path, "a", "0")], [], ["a", "b", "c"])
    recipe = image_cls.Recipe(config, net, resolve_data_config(net, 32), data)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    expected = None
    for step in range(1, 5):
        loss = recipe.loss_sum(
            net, {"pixels": torch.randint(0, 255, (4, 3, 32, 32)), "labels": torch.tensor([0, 1, 2, 0])}
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        recipe.after_step(net, step)
        weights = {k: v.detach().clone() for k, v in net.named_parameters()}
        # timm ModelEmaV3: the first update copies (decay 0 at step 1), then e = d * e + (1 - d) * w
        expected = weights if expected is None else {k: 0.7 * expected[k] + 0.3 * weights[k] for k in weights}
    averaged = dict(recipe.ema.module.named_parameters())
    for name, value in expected.items():
        assert torch.allclose(averaged[name], value, atol=1e-6), name


def test_tta_averages_views_back_to_their_images() -> None:
    # a "model" whose logits are the mean of the left and right halves: flipping swaps them
    def predict(pixels: torch.Tensor) -> torch.Tensor:
        width = pixels.shape[-1]
        return torch.stack(
            [pixels[..., : width // 2].mean(dim=(1, 2, 3)), pixels[..., width // 2 :].mean(dim=(1, 2, 3))], 1
        )

    images = torch.rand(5, 3, 4, 4)
    reordered = [4, 0, 3, 1, 2]  # batches arrive out of order; positions say whose they are
    batches = [
        (torch.tensor(reordered[:2]), images[reordered[:2]]),
        (torch.tensor(reordered[2:]), images[reordered[2:]]),
    ]
    got = tta_probabilities(predict, [batches, batches], n_images=5, flip=True)
    plain = torch.softmax(predict(images), dim=1)
    flipped = torch.softmax(predict(images.flip(-1)), dim=1)
    assert torch.allclose(got, (plain + flipped) / 2, atol=1e-6)
    assert torch.allclose(got.sum(dim=1), torch.ones(5))


def test_classification_report() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    report = classification_report(scores, torch.tensor([0, 1, 2, 2]), ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert report["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert report["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert report["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert "top5" not in report  # three classes: top-5 says nothing


def test_stratified_split_keeps_every_class_in_both_parts() -> None:
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 3 + ["d"]
    train, valid = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + valid) == list(range(len(labels)))
    picked = [labels[i] for i in valid]
    assert picked.count("a") == 10 and picked.count("b") == 2 and picked.count("c") == 1 and "d" not in picked
    assert stratified_split(labels, 0.2, seed=3) == (train, valid)


def test_balanced_sampling_is_seeded_and_balanced() -> None:
    weights = [1 / 90] * 90 + [1 / 10] * 10  # 90 of class 0, 10 of class 1
    batches = epoch_batches(100, 10, seed=1, epoch=0, weights=weights)
    drawn = [i for batch in batches for i in batch]
    assert len(drawn) == 100 and 30 < sum(i >= 90 for i in drawn) < 70  # about half from the small class
    assert batches == epoch_batches(100, 10, seed=1, epoch=0, weights=weights)  # resume sees the same order
    assert batches != epoch_batches(100, 10, seed=1, epoch=1, weights=weights)


def test_augmentation_depends_on_seed_epoch_and_image_only(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    config = validate_config({"task": "image_cls"})
    transform = image_cls.train_transform(
        config,
        {
            "input_size": (3, 16, 16),
            "interpolation": "bilinear",
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "crop_pct": 1.0,
        },
    )
    dataset = ImageDataset([ImageSample(path, "a", "0")] * 2, {"a": 0}, transform, seed=7)
    first = dataset[0][0]
    torch.manual_seed(123)  # the global streams do not matter
    assert np.array_equal(dataset[0][0], first)
    assert not np.array_equal(dataset[1][0], first)  # another image position, another draw
    dataset.set_epoch(1)
    assert not np.array_equal(dataset[0][0], first)
