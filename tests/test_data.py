"""batchfit._data on small files written in the real on-disk formats (no downloads).

MNIST: IDX files (big-endian magic 2051/2049, dims, uint8) under ROOT/MNIST/raw; CIFAR-10: pickled
python batches under ROOT/cifar-10-batches-py; folders: PNGs written with PIL. Every dataset goes
through the torchvision class a user's real download goes through; for CIFAR-10 only its md5
check is stood in for (real checksums cannot match synthetic files).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from batchfit import _data as bdata
from batchfit._datasets import get_dataset
from batchfit._errors import BatchfitError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- writers for the real formats --------------------------------------------------------------------


def write_idx_pair(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    n, h, w = images.shape
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_mnist(
    root: Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    folder: str = "MNIST",
) -> None:
    write_idx_pair(root / folder / "raw", "train", *train)
    write_idx_pair(root / folder / "raw", "t10k", *test)


def random_mnist(root: Path, n_train: int = 70, n_test: int = 9, seed: int = 0, folder: str = "MNIST"):
    rng = np.random.default_rng(seed)
    train = (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8))
    test = (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8))
    write_mnist(root, train, test, folder)
    return train, test


def write_cifar(
    root: Path, train_hwc: np.ndarray, train_labels: list[int], test_hwc: np.ndarray, test_labels: list[int]
):
    """CIFAR-10's python version: rows of 3,072 bytes (1,024 R, then G, then B), 5 train batches."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: list[int]) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)
        entry = {
            "batch_label": f"{name} of synthetic",
            "labels": list(labels),
            "data": np.ascontiguousarray(rows),
            "filenames": [f"img_{i}.png" for i in range(len(images))],
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    for k, chunk in enumerate(np.array_split(np.arange(len(train_hwc)), 5), start=1):
        dump(f"data_batch_{k}", train_hwc[chunk], [train_labels[i] for i in chunk])
    dump("test_batch", test_hwc, test_labels)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=2)


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand in for torchvision's md5 verification only: the files must still exist."""

    def exists_only(fpath: str | os.PathLike[str], md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists_only)


@pytest.fixture
def mnist_root(tmp_path: Path):
    train, test = random_mnist(tmp_path)
    return tmp_path, train, test


@pytest.fixture
def cifar_root(tmp_path: Path, skip_cifar_md5: None):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (15, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    train_labels = [int(v) for v in rng.integers(0, 10, 15)]
    write_cifar(tmp_path, train, train_labels, test, [0, 1, 2, 3])
    return tmp_path, train, train_labels


def write_png_folder(root: Path, images: dict[str, list[np.ndarray]]) -> None:
    from PIL import Image

    for cls, arrays in images.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(arrays):
            Image.fromarray(arr).save(root / cls / f"{i}.png")


# --- loading -------------------------------------------------------------------------------------------


def test_mnist_from_idx_files(mnist_root) -> None:
    root, (images, labels), _ = mnist_root
    ds = bdata.load_dataset("mnist", root=root)
    assert ds.source == "torchvision.datasets.MNIST" and ds.split == "train"
    assert len(ds) == len(images) == 70
    x, y = ds.dataset[3]
    assert tuple(x.shape) == (1, 28, 28) and x.dtype == torch.float32
    assert y == int(labels[3])
    expected = (images[3].astype(np.float64) / 255 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=0, atol=1e-5)
    info = get_dataset("mnist")
    assert ds.stored_bytes_per_sample == info.stored_bytes_per_sample == 28 * 28
    assert ds.tensor_bytes_per_sample == info.float32_bytes_per_sample == 4 * 28 * 28
    assert ds.ram_image_bytes == images.nbytes and ds.ram_label_bytes == 8 * 70


def test_mnist_test_split_and_fashion_layout(tmp_path: Path) -> None:
    _, (test_images, _) = random_mnist(tmp_path, n_test=9, folder="FashionMNIST")
    ds = bdata.load_dataset("fashion-mnist", root=tmp_path, split="test")
    assert len(ds) == len(test_images)
    assert ds.classes[0] == "T-shirt/top" and ds.mean == (0.2860,)


def test_root_defaults_to_env_variable(mnist_root, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _, _ = mnist_root
    monkeypatch.setenv("BATCHFIT_DATA", str(root))
    assert bdata.default_root() == root
    assert len(bdata.load_dataset("MNIST")) == 70
    monkeypatch.delenv("BATCHFIT_DATA")
    assert bdata.default_root() == Path("data")


def test_missing_dataset_names_files_place_and_download(tmp_path: Path) -> None:
    with pytest.raises(BatchfitError) as err:
        bdata.load_dataset("mnist", root=tmp_path)
    message = err.value.message
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in message
    assert str((tmp_path / "MNIST" / "raw").resolve()) in message
    assert "`download=True`" in (err.value.hint or "")

    # Only the test files present: exactly the train files are missing (torchvision needs all four).
    rng = np.random.default_rng(0)
    write_idx_pair(
        tmp_path / "MNIST" / "raw", "t10k", rng.integers(0, 256, (2, 28, 28), np.uint8), np.zeros(2, np.uint8)
    )
    with pytest.raises(BatchfitError) as err:
        bdata.load_dataset("mnist", root=tmp_path, split="test")
    missing = err.value.message.split("missing ")[1].split(" (")[0]
    assert missing == "train-images-idx3-ubyte, train-labels-idx1-ubyte"


def test_missing_cifar_lists_its_batches(tmp_path: Path) -> None:
    with pytest.raises(BatchfitError) as err:
        bdata.load_dataset("cifar10", root=tmp_path)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        assert name in err.value.message
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in err.value.message


def test_download_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_download(self: torchvision.datasets.MNIST) -> None:  # what a download leaves behind
        calls.append(self.raw_folder)
        random_mnist(Path(self.root), n_train=5, n_test=2)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    with pytest.raises(BatchfitError):
        bdata.load_dataset("mnist", root=tmp_path / "new")
    assert calls == []
    ds = bdata.load_dataset("mnist", root=tmp_path / "new", download=True)
    assert len(ds) == 5 and calls == [str(tmp_path / "new" / "MNIST" / "raw")]


def test_unknown_names_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(BatchfitError) as err:
        bdata.load_dataset("mnst")
    assert "'mnist'" in (err.value.hint or "") and "folder" in (err.value.hint or "")
    with pytest.raises(BatchfitError) as err:
        bdata.load_dataset("imagenet", root=tmp_path)
    assert "folder" in (err.value.hint or "")
    with pytest.raises(BatchfitError, match="not a folder"):
        bdata.load_dataset(str(tmp_path / "nowhere" / "x"))
    with pytest.raises(BatchfitError, match="unknown split"):
        bdata.load_dataset("mnist", root=tmp_path, split="val")
    with pytest.raises(BatchfitError, match="3 values"):
        random_mnist(tmp_path)
        bdata.load_dataset("mnist", root=tmp_path, mean=(0.1, 0.2, 0.3))


def test_cifar_from_pickled_batches(cifar_root) -> None:
    root, train, labels = cifar_root
    ds = bdata.load_dataset("cifar10", root=root)
    assert len(ds) == 15 and ds.classes == tuple(CIFAR_NAMES)
    x, y = ds.dataset[7]
    assert tuple(x.shape) == (3, 32, 32) and y == labels[7]
    # ToTensor turns the HWC image into CHW; Normalize(0.5, 0.5) maps [0, 1] to [-1, 1].
    expected = (train[7].transpose(2, 0, 1).astype(np.float64) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-6)
    assert ds.stored_bytes_per_sample == 3072 and ds.tensor_bytes_per_sample == 12288
    assert ds.ram_image_bytes == 15 * 3072


def test_cifar_checksums_are_checked_for_real(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    write_cifar(
        tmp_path,
        rng.integers(0, 256, (5, 32, 32, 3), np.uint8),
        [0] * 5,
        rng.integers(0, 256, (1, 32, 32, 3), np.uint8),
        [1],
    )
    with pytest.raises(BatchfitError, match="corrupted") as err:
        bdata.load_dataset("cifar10", root=tmp_path)
    assert "`download=True`" in (err.value.hint or "")


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    write_png_folder(
        tmp_path,
        {
            "cats": [rng.integers(0, 256, (12, 10, 3), np.uint8) for _ in range(3)],
            "dogs": [rng.integers(0, 256, (9, 16, 3), np.uint8) for _ in range(2)],
        },
    )
    ds = bdata.load_dataset(tmp_path, size=8)
    assert ds.classes == ("cats", "dogs") and len(ds) == 5 and ds.split is None
    assert ds.sample_shape == (3, 8, 8) and ds.stored_bytes_per_sample == 3 * 8 * 8
    assert ds.ram_image_bytes == 0  # ImageFolder reads files per item
    report = bdata.describe(ds, batch_sizes=[4])
    assert report.probe_batch_shape == (4, 3, 8, 8) and report.rows[0].batches_per_epoch == 2
    # Mixed sizes without --size cannot be batched: the error says how to fix it.
    with pytest.raises(BatchfitError) as err:
        bdata.describe(bdata.load_dataset(tmp_path), batch_sizes=[4])
    assert "`size=N`" in (err.value.hint or "")


def test_image_folder_split_and_empty(tmp_path: Path) -> None:
    write_png_folder(tmp_path / "train", {"a": [np.zeros((4, 4, 3), np.uint8)]})
    assert len(bdata.load_dataset(tmp_path, split="train")) == 1
    with pytest.raises(BatchfitError, match="no 'test' sub-folder"):
        bdata.load_dataset(tmp_path, split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchfitError, match="no images found"):
        bdata.load_dataset(tmp_path / "empty")


# --- statistics -----------------------------------------------------------------------------------


def test_channel_stats_mnist_match_numpy(mnist_root) -> None:
    root, (images, _), _ = mnist_root
    ds = bdata.load_dataset("mnist", root=root)
    pixels = images.astype(np.float64) / 255
    for use_array in (True, False):  # the uint8 array and the per-item ToTensor path
        stats = bdata.channel_stats(ds, batch_size=16, use_array=use_array)  # 16 does not divide 70
        assert stats.num_samples == 70 and stats.pixels_per_channel == pixels.size
        tol = 1e-12 if use_array else 1e-6  # ToTensor divides in float32
        assert stats.mean[0] == pytest.approx(pixels.mean(), abs=tol)
        assert stats.std[0] == pytest.approx(pixels.std(), abs=tol)


def test_channel_stats_cifar_per_channel(cifar_root) -> None:
    root, train, _ = cifar_root
    ds = bdata.load_dataset("cifar10", root=root)
    pixels = train.astype(np.float64) / 255
    for use_array in (True, False):
        stats = bdata.channel_stats(ds, batch_size=4, use_array=use_array)
        np.testing.assert_allclose(stats.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-6)
        np.testing.assert_allclose(stats.std, pixels.std(axis=(0, 1, 2)), atol=1e-6)


def test_channel_stats_are_numerically_sound() -> None:
    """Values far from zero with a tiny spread: E[x^2] - E[x]^2 in float32 would lose them."""
    rng = np.random.default_rng(4)
    base = np.full((300, 28, 28), 250, np.uint8)
    base[:, ::2, ::3] += rng.integers(0, 6, base[:, ::2, ::3].shape, dtype=np.uint8)
    ds = _in_memory_mnist(base)
    stats = bdata.channel_stats(ds, batch_size=7)
    pixels = base.astype(np.float64) / 255
    assert stats.mean[0] == pytest.approx(pixels.mean(), rel=1e-12)
    assert stats.std[0] == pytest.approx(pixels.std(), rel=1e-9)


def _in_memory_mnist(images: np.ndarray) -> bdata.LoadedDataset:
    ds = torchvision.datasets.MNIST.__new__(torchvision.datasets.MNIST)
    torchvision.datasets.VisionDataset.__init__(ds, "unused")
    ds.data = torch.from_numpy(images)
    ds.targets = torch.zeros(len(images), dtype=torch.int64)
    return bdata.LoadedDataset("mnist", "test", "train", Path("unused"), ds, (0.5,), (0.5,), tuple("0123456789"))


def test_channel_stats_of_a_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (6, 6, 3), np.uint8) for _ in range(5)]
    write_png_folder(tmp_path, {"x": arrays[:2], "y": arrays[2:]})
    stats = bdata.channel_stats(bdata.load_dataset(tmp_path), batch_size=2)
    pixels = np.stack(arrays).astype(np.float64) / 255
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(stats.std, pixels.std(axis=(0, 1, 2)), atol=1e-6)


# --- host memory ---------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


@pytest.mark.parametrize("batch_size", [64, 256, 1024, 4096])
@pytest.mark.parametrize("workers,prefetch,pin", [(0, None, False), (0, None, True), (4, None, False), (3, 5, True)])
def test_host_memory_static(batch_size: int, workers: int, prefetch: int | None, pin: bool) -> None:
    m = bdata.host_memory("mnist", batch_size, num_workers=workers, prefetch_factor=prefetch, pin_memory=pin)
    in_flight = workers * (prefetch or 2) if workers else 1
    images, labels = batch_size * 28 * 28 * 4, batch_size * 8
    pinned = in_flight * (_pow2(images) + _pow2(labels)) if pin else 0
    assert m.batches_in_flight == in_flight
    assert (m.batch_image_bytes, m.batch_label_bytes) == (images, labels)
    assert m.dataset_image_bytes == 47_040_000 and m.dataset_label_bytes == 480_000
    assert m.pinned_bytes == pinned
    assert m.total_bytes == 47_040_000 + 480_000 + in_flight * (images + labels) + pinned
    assert sum(m.breakdown().values()) == m.total_bytes
    assert m.to_dict()["schema_version"] == 1 and json.dumps(m.to_dict())


def test_host_memory_presets_and_errors() -> None:
    assert bdata.host_memory("cifar10", 64, split="test").dataset_image_bytes == 10_000 * 3072
    assert bdata.host_memory("imagenet", 64).dataset_image_bytes == 0  # read from files per item
    with pytest.raises(BatchfitError, match="prefetch_factor"):
        bdata.host_memory("mnist", 64, prefetch_factor=2)
    with pytest.raises(BatchfitError):
        bdata.host_memory("mnist", 0)


def test_host_memory_of_loaded_dataset(mnist_root) -> None:
    root, (images, _), _ = mnist_root
    ds = bdata.load_dataset("mnist", root=root)
    m = bdata.host_memory(ds, 64, num_workers=2)
    assert m.dataset_image_bytes == images.nbytes and m.dataset_label_bytes == 70 * 8
    assert m.batches_in_flight == 4 and m.batch_image_bytes == 64 * 3136
    assert bdata.host_memory(ds, 4096).batch_image_bytes == 70 * 3136  # a batch holds at most the dataset


# --- the report --------------------------------------------------------------------------------------


def test_describe_mnist(mnist_root) -> None:
    root, (images, labels), _ = mnist_root
    ds = bdata.load_dataset("mnist", root=root)
    report = bdata.describe(ds, batch_sizes=[64, 256], stats=True)
    assert report.sample_shape == (1, 28, 28) and report.sample_dtype == "float32"
    assert report.probe_batch_shape == (64, 1, 28, 28) and report.label_dtype == "int64"
    first = images[:64].astype(np.float64) / 255
    assert report.range_before == pytest.approx((first.min(), first.max()), abs=1e-6)
    assert report.range_after == pytest.approx(
        ((first.min() - MNIST_MEAN) / MNIST_STD, (first.max() - MNIST_MEAN) / MNIST_STD), abs=1e-5
    )
    assert report.range_after_bounds[0] == pytest.approx((-MNIST_MEAN / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD))
    row64, row256 = report.rows
    assert (row64.stored_bytes, row64.input_bytes, row64.label_bytes) == (64 * 784, 64 * 3136, 64 * 8)
    assert row64.batches_per_epoch == 2 and row64.batch_shape == (64, 1, 28, 28)
    assert row256.batch_shape == (70, 1, 28, 28) and row256.batches_per_epoch == 1
    assert report.stats is not None and report.stats.mean[0] == pytest.approx(images.mean() / 255)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["schema_version"] == 1 and d["num_samples"] == 70 and d["stored_bytes_per_sample"] == 784
    assert d["batches"][0]["host_memory"]["breakdown"]["dataset_images"] == images.nbytes
    assert d["classes"][int(labels[0])].startswith(str(int(labels[0])))


def test_report_text_layout(mnist_root, golden) -> None:
    root, _, _ = mnist_root
    report = bdata.describe(bdata.load_dataset("mnist", root=root), num_workers=2, pin_memory=True, stats=True)
    golden("data_show_mnist.txt", str(replace(report, root="ROOT")))


# --- the sample grid -----------------------------------------------------------------------------------

PALETTE = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (128, 64, 32),
    (32, 64, 128),
    (200, 200, 200),
    (10, 10, 10),
]


def _pixel(png: np.ndarray, fig_height: float, ax, fx: float, fy: float) -> np.ndarray:
    """The PNG pixel at fraction (fx from the left, fy from the top) of the axes' image."""
    box = ax.images[0].get_window_extent()
    x = box.x0 + fx * box.width
    y = fig_height - (box.y1 - fy * box.height)  # display y grows upwards, PNG rows downwards
    return png[int(y), int(x), :3].astype(int)


def test_grid_colours_channel_order_and_labels(tmp_path: Path, skip_cifar_md5: None) -> None:
    from PIL import Image

    labels = [i % 10 for i in range(12)]
    train = np.stack([np.broadcast_to(np.array(PALETTE[k], np.uint8), (32, 32, 3)) for k in labels]).copy()
    train[0, :16] = PALETTE[0]  # top half red, bottom half green: catches (H, W) mix-ups
    train[0, 16:] = PALETTE[1]
    write_cifar(tmp_path, train, labels, train[:2], labels[:2])
    ds = bdata.load_dataset("cifar10", root=tmp_path)

    fig = bdata.sample_grid(ds, n=12, seed=3)
    path = tmp_path / "grid.png"
    fig.savefig(path, dpi=fig.dpi)
    png = np.asarray(Image.open(path).convert("RGBA"))
    assert png.shape[:2] == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))
    indices = bdata.sample_indices(len(ds), 12, seed=3)
    assert sorted(indices) == list(range(12))
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 12
    height = fig.bbox.height
    for ax, index in zip(axes, indices, strict=True):
        assert ax.get_title() == CIFAR_NAMES[labels[index]]
        if index == 0:
            assert np.abs(_pixel(png, height, ax, 0.75, 0.25) - PALETTE[0]).max() <= 2
            assert np.abs(_pixel(png, height, ax, 0.25, 0.75) - PALETTE[1]).max() <= 2
        else:
            assert np.abs(_pixel(png, height, ax, 0.5, 0.5) - PALETTE[labels[index]]).max() <= 2


def test_grid_grayscale_is_denormalised(tmp_path: Path) -> None:
    from PIL import Image

    levels = np.array([0, 30, 77, 128, 200, 255, 13, 99, 180, 240], np.uint8)
    labels = np.arange(10, dtype=np.uint8)
    images = np.stack([np.full((28, 28), v, np.uint8) for v in levels])
    write_mnist(tmp_path, (images, labels), (images[:2], labels[:2]))
    ds = bdata.load_dataset("mnist", root=tmp_path)
    fig = bdata.sample_grid(ds, n=4, seed=0)
    fig.savefig(tmp_path / "g.png", dpi=fig.dpi)
    png = np.asarray(Image.open(tmp_path / "g.png").convert("RGBA"))
    axes = [ax for ax in fig.axes if ax.images]
    for ax, index in zip(axes, bdata.sample_indices(10, 4, seed=0), strict=True):
        # Without undoing Normalize the black image (-0.42) and white one (2.82) would clip to 0 and 1
        # and every grey in between would be off; with it each grey comes back to its byte value.
        assert np.abs(_pixel(png, fig.bbox.height, ax, 0.5, 0.5) - int(levels[index])).max() <= 2
        assert ax.get_title() == ds.classes[index]


def test_denormalize_and_channels_last() -> None:
    from torchvision.transforms import Normalize

    x = torch.rand(3, 5, 7)
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.3, 0.5)
    back = bdata.denormalize(Normalize(mean, std)(x), mean, std)
    torch.testing.assert_close(back, x)
    hwc = bdata.to_hwc(x)
    assert hwc.shape == (5, 7, 3) and hwc[4, 6, 2] == x[2, 4, 6].item()


def test_sample_indices_reproducible() -> None:
    assert bdata.sample_indices(100, 16, seed=1) == bdata.sample_indices(100, 16, seed=1)
    assert bdata.sample_indices(100, 16, seed=1) != bdata.sample_indices(100, 16, seed=2)
    assert len(set(bdata.sample_indices(100, 16))) == 16
    assert sorted(bdata.sample_indices(5, 16)) == [0, 1, 2, 3, 4]
    with pytest.raises(BatchfitError):
        bdata.sample_indices(5, 0)


# --- the command ---------------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from batchfit.cli import app

    monkeypatch.setattr(bdata, "display_available", lambda: False)  # never open a window in tests
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["show", *args])


def test_cli_json_with_grid_and_stats(mnist_root, cli, tmp_path: Path) -> None:
    from PIL import Image

    root, (images, _), _ = mnist_root
    out = tmp_path / "out" / "grid.png"
    result = cli("mnist", "--root", str(root), "--json", "--stats", "--grid", "4", "--out", str(out), "-b", "8,64")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [row["batch_size"] for row in d["batches"]] == [8, 64]
    assert d["batches"][1]["input_bytes"] == 64 * 3136
    assert d["stats"]["mean"][0] == pytest.approx(images.mean() / 255)
    assert d["grid"]["indices"] == bdata.sample_indices(70, 4, seed=42) and d["grid"]["path"] == str(out)
    assert Image.open(out).size[0] > 100


def test_cli_text_and_no_display_note(mnist_root, cli) -> None:
    root, _, _ = mnist_root
    result = cli("mnist", "--root", str(root), "--num-workers", "2", "--prefetch-factor", "3")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # the terminal width decides where lines wrap
    assert "(64, 1, 28, 28)" in text and "6 batches in flight (2 workers x prefetch_factor 3)" in text
    assert "--out grid.png" in result.stderr


def test_cli_errors(tmp_path: Path, cli) -> None:
    result = cli("mnist", "--root", str(tmp_path))
    assert result.exit_code == 3
    assert "train-images-idx3-ubyte" in result.stderr and "--download" in result.stderr
    result = cli("cifar", "--root", str(tmp_path))
    assert result.exit_code == 3 and "cifar10" in result.stderr
    result = cli("mnist", "--batch-size", "64,x")
    assert result.exit_code == 3 and "batch sizes" in result.stderr


def test_cli_gpu_estimate_beside_host_ram(mnist_root, cli) -> None:
    """--model adds one training step's GPU memory (the estimator's) beside the DataLoader's host RAM."""
    from batchfit import estimate

    root, _, _ = mnist_root
    result = cli("mnist", "--root", str(root), "--json", "--grid", "0", "-b", "8,64", "--model", "mlp", "--gpu", "t4")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    gpu = d["gpu_estimate"]["results"]
    expected = estimate("mlp", dataset="mnist", batch_size=[8, 64], gpu="t4")
    assert [r["peak_allocated_bytes"] for r in gpu] == [r.peak_allocated_bytes for r in expected]
    text = cli("mnist", "--root", str(root), "--grid", "0", "-b", "64", "--model", "mlp")
    assert text.exit_code == 0 and "the GPU beside the host" in text.stdout and "host RAM" in text.stdout
