"""The dataset registry: static facts about each preset (no files needed).

Loading real files lives in :mod:`batchfit._data`; this module only knows shapes, sizes and the
seed's normalisation, so that ``--dataset mnist`` works for summaries and estimates anywhere.

>>> get_dataset("MNIST").shape, get_dataset("cifar10").train_size
((1, 28, 28), 50000)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ._errors import BatchfitError
from ._i18n import tr


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple[int, ...]  # one sample, (C, H, W), without the batch dimension
    num_classes: int
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    stored_dtype: str = "uint8"  # how one sample is stored on disk / in the torchvision dataset
    # Loading facts (used by batchfit._data): the torchvision class that reads the files (None: no
    # automatic loader), and whether that class keeps every image in RAM as one uint8 array
    # (MNIST, CIFAR-10) rather than reading files per item (ImageFolder-style datasets).
    torchvision_class: str | None = None
    images_in_ram: bool = False

    @property
    def stored_bytes_per_sample(self) -> int:
        """Bytes of one sample as stored (uint8): 784 for MNIST, 3,072 for CIFAR-10."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def float32_bytes_per_sample(self) -> int:
        """Bytes of one sample as a float32 tensor: 3,136 for MNIST, 12,288 for CIFAR-10."""
        return 4 * self.stored_bytes_per_sample


_DIGITS = tuple(str(i) for i in range(10))
DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            "mnist",
            (1, 28, 28),
            10,
            60_000,
            10_000,
            (0.1307,),
            (0.3081,),
            _DIGITS,
            torchvision_class="MNIST",
            images_in_ram=True,
        ),
        DatasetInfo(
            "fashion-mnist",
            (1, 28, 28),
            10,
            60_000,
            10_000,
            (0.2860,),
            (0.3530,),
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            torchvision_class="FashionMNIST",
            images_in_ram=True,
        ),
        DatasetInfo(
            "cifar10",
            (3, 32, 32),
            10,
            50_000,
            10_000,
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
            torchvision_class="CIFAR10",
            images_in_ram=True,
        ),
        # scikit-learn's bundled 8x8 digits (1,797 images, values 0..16; batchfit._sweep reads them,
        # no download): the first 1,437 images train, the last 360 validate. mean/std: of the training
        # images scaled to [0, 1] (tests/test_sweep.py recomputes them from the file).
        DatasetInfo(
            "digits",
            (1, 8, 8),
            10,
            1_437,
            360,
            (0.3054,),
            (0.3755,),
            _DIGITS,
        ),
        DatasetInfo(
            "imagenet",
            (3, 224, 224),
            1000,
            1_281_167,
            50_000,
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
            tuple(f"class {i}" for i in range(1000)),
        ),
    )
}
_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}


def get_dataset(name: str) -> DatasetInfo:
    """Look a preset up by name (case-insensitive, with suggestions)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in DATASETS:
        return DATASETS[key]
    close = difflib.get_close_matches(key, list(DATASETS), n=3)
    hint = (
        tr("did you mean {names}?", names=", ".join(repr(c) for c in close))
        if close
        else tr("known: {names}", names=", ".join(DATASETS))
    )
    raise BatchfitError(tr("unknown dataset {name!r}", name=name), hint=hint)
