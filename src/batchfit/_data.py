"""The seed's image data: loading, shapes, normalisation, sample grids, statistics, host memory.

The lesson loads MNIST and CIFAR-10 through torchvision with ``ToTensor()`` + ``Normalize(mean, std)``,
looks at one sample's ``(C, H, W)`` tensor and a DataLoader's ``(N, C, H, W)`` batch, undoes the
normalisation to show images (``img * std + mean``, channels moved last), and counts bytes per
sample. This module does the same for ``mnist``, ``fashion-mnist``, ``cifar10`` and any folder of
class sub-folders, and adds what the lesson hints at: per-channel statistics and the host RAM a
DataLoader holds next to the GPU estimate.

Nothing is downloaded unless asked (``download=True``). Host memory needs no files at all:

>>> mem = host_memory("mnist", 64)
>>> mem.dataset_image_bytes, mem.batch_image_bytes, mem.batch_label_bytes
(47040000, 200704, 512)
"""

from __future__ import annotations

import copy
import math
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

from ._datasets import DATASETS, DatasetInfo, get_dataset
from ._errors import BatchfitError
from ._i18n import tr
from ._render import Facts, Rendered, Section, Table, Text
from ._units import format_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.progress import Progress
    from torch.utils.data import Dataset

SCHEMA_VERSION = 1
DEFAULT_BATCH_SIZES: tuple[int, ...] = (64, 256, 1024, 4096)  # the seed's table
DEFAULT_GRID_SEED = 42  # the seed calls torch.manual_seed(42) before drawing its random image
ENV_ROOT = "BATCHFIT_DATA"
LABEL_BYTES = 8  # DataLoader collates Python int labels into an int64 tensor
# A folder of images has no published statistics; the seed's colour convention maps [0, 1] to [-1, 1].
FOLDER_MEAN_STD = 0.5
SPLITS: dict[str, bool] = {"train": True, "test": False}  # split -> torchvision's ``train=`` flag


def default_root() -> Path:
    """Where presets live unless ``root`` is given: ``$BATCHFIT_DATA``, else ``./data`` (the seed's)."""
    return Path(os.environ.get(ENV_ROOT) or "data")


# --- where torchvision expects each preset's files --------------------------------------------------


def _idx_files(cls: type, root: Path) -> list[Path]:
    # torchvision's MNIST family reads the unpacked IDX files (the .gz names minus ".gz") and needs all
    # four, train and test, whichever split is asked for; its old processed/*.pt cache also loads.
    processed = root / cls.__name__ / "processed"
    if all((processed / f).is_file() for f in (cls.training_file, cls.test_file)):  # type: ignore[attr-defined]
        return []
    raw = root / cls.__name__ / "raw"
    return [raw / os.path.splitext(name)[0] for name, _md5 in cls.resources]  # type: ignore[attr-defined]


def _cifar_files(cls: type, root: Path) -> list[Path]:
    base = root / cls.base_folder  # type: ignore[attr-defined]
    names = [name for name, _md5 in cls.train_list + cls.test_list]  # type: ignore[attr-defined]
    return [base / name for name in [*names, cls.meta["filename"]]]  # type: ignore[attr-defined]


# torchvision class name -> the files that class needs under ``root`` (read from the class itself,
# so the list follows torchvision's own resource tables).
_REQUIRED_FILES: dict[str, Callable[[type, Path], list[Path]]] = {
    "MNIST": _idx_files,
    "FashionMNIST": _idx_files,
    "CIFAR10": _cifar_files,
}


def required_files(name: str, root: str | Path | None = None) -> list[Path]:
    """The files torchvision needs for a preset under ``root`` (all splits: it checks them all).

    >>> [p.as_posix() for p in required_files("mnist", "/data")][:2]
    ['/data/MNIST/raw/train-images-idx3-ubyte', '/data/MNIST/raw/train-labels-idx1-ubyte']
    """
    info = get_dataset(name)
    cls = _torchvision_class(info)
    return _REQUIRED_FILES[cls.__name__](cls, Path(root) if root is not None else default_root())


def _torchvision_class(info: DatasetInfo) -> type:
    import torchvision.datasets

    if info.name == "digits":  # registered for batchfit.sweep, which reads scikit-learn's copy
        raise BatchfitError(
            tr("the digits ship inside scikit-learn as an array, not as torchvision files or image folders"),
            hint=tr(
                "use them with `batchfit sweep MODEL --dataset digits`, or pick mnist, fashion-mnist or cifar10 here"
            ),
        )
    if info.torchvision_class is None or info.torchvision_class not in _REQUIRED_FILES:
        raise BatchfitError(
            tr("batchfit cannot load {name!r} by itself (torchvision does not download it)", name=info.name),
            hint=tr("extract it and pass the folder of class sub-folders, e.g. `batchfit show path/to/{name}/train --size {shape}`", name=info.name, shape=info.shape[-1]),
        )
    return getattr(torchvision.datasets, info.torchvision_class)  # type: ignore[no-any-return]


# --- the loaded dataset ----------------------------------------------------------------------------


@dataclass
class LoadedDataset:
    """A dataset read from disk with the seed's transforms, plus what batchfit reports about it.

    ``dataset`` is the torchvision dataset itself (``MNIST``, ``CIFAR10``, ``ImageFolder``), its
    ``transform`` being ``[Resize(size), CenterCrop(size),] ToTensor(), Normalize(mean, std)``;
    use it in a DataLoader exactly as the seed does.
    """

    name: str  # preset name, or the folder as given
    source: str  # e.g. "torchvision.datasets.MNIST"
    split: str | None  # None: a folder used as it is
    root: Path  # the directory the files were read from
    dataset: Dataset[Any]
    mean: tuple[float, ...]  # per channel
    std: tuple[float, ...]
    classes: tuple[str, ...]
    size: int | None = None  # --size: images resized and centre-cropped to size x size
    info: DatasetInfo | None = None  # the registry entry of a preset
    pre_transforms: tuple[Any, ...] = field(default=(), repr=False)  # everything before Normalize

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def unnormalized(self) -> Dataset[Any]:
        """The same samples without ``Normalize``: values in [0, 1] (for statistics and ranges).

        A shallow copy: the image array is shared, not duplicated.
        """
        from torchvision.datasets.vision import StandardTransform
        from torchvision.transforms import Compose

        view = copy.copy(self.dataset)
        view.transform = Compose(list(self.pre_transforms))  # type: ignore[attr-defined]
        view.transforms = StandardTransform(view.transform, getattr(view, "target_transform", None))  # type: ignore[attr-defined]
        return view

    @cached_property
    def first_sample(self) -> torch.Tensor:
        return self.dataset[0][0]  # type: ignore[no-any-return]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One transformed sample, (C, H, W)."""
        return tuple(self.first_sample.shape)

    @property
    def tensor_bytes_per_sample(self) -> int:
        """Bytes of one sample as the tensor the model gets (float32: 3,136 for MNIST)."""
        return self.first_sample.numel() * self.first_sample.element_size()

    @property
    def stored_bytes_per_sample(self) -> int:
        """Bytes of one sample as stored: the uint8 array's row for MNIST/CIFAR-10 (784 / 3,072);
        for a folder, the decoded uint8 image at the model's size (the files are compressed)."""
        data = getattr(self.dataset, "data", None)
        if data is not None and len(data):
            return int(data[0].nbytes)
        return math.prod(self.sample_shape)

    @property
    def ram_image_bytes(self) -> int:
        """The image array the dataset object keeps in RAM (0 when it reads files per item)."""
        data = getattr(self.dataset, "data", None)
        return int(data.nbytes) if data is not None else 0

    @property
    def ram_label_bytes(self) -> int:
        """The dataset's labels: an int64 tensor (MNIST) or a list of pointers to small ints (8 B each)."""
        targets = getattr(self.dataset, "targets", None)
        if isinstance(targets, torch.Tensor):
            return targets.numel() * targets.element_size()
        return LABEL_BYTES * len(self)


def load_dataset(
    name_or_path: str | Path,
    root: str | Path | None = None,
    split: str | None = None,
    download: bool = False,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedDataset:
    """Load a preset (``mnist``, ``fashion-mnist``, ``cifar10``) or a folder of class sub-folders.

    Presets are read from ``root`` (default :func:`default_root`) in torchvision's own layout and
    are fetched only with ``download=True``. ``split`` is ``train`` (default) or ``test``; for a
    folder it names a sub-folder (``path/train``), and without it the folder is used as it is.
    ``mean``/``std`` replace the normalisation (presets: the seed's; folders: 0.5 per channel).
    """
    if size is not None and size < 1:
        raise BatchfitError(tr("`size` must be a positive number of pixels, not {size}", size=size), hint=tr("e.g. `size=64`"))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_folder(path, split, size, mean, std)
    text = str(name_or_path)
    if os.sep in text or "/" in text or text.startswith((".", "~")) or path.exists():
        raise BatchfitError(
            tr("{text!r} is not a folder", text=text),
            hint=tr(
                "give a folder with one sub-folder of images per class, or a preset: {names}",
                names=", ".join(_loadable()),
            ),
        )
    try:
        info = get_dataset(text)
    except BatchfitError as exc:
        raise BatchfitError(
            exc.message, hint=tr("{hint}; or give a folder of class sub-folders", hint=exc.hint)
        ) from None
    return _load_preset(info, Path(root) if root is not None else default_root(), split, download, size, mean, std)


def _loadable() -> list[str]:
    return [name for name, info in DATASETS.items() if info.torchvision_class in _REQUIRED_FILES]


def _check_split(split: str | None) -> str:
    split = split or "train"
    if split not in SPLITS:
        raise BatchfitError(
            tr("unknown split {split!r}", split=split), hint=tr("use one of {names}", names=", ".join(SPLITS))
        )
    return split


def _normalization(
    default_mean: Sequence[float],
    default_std: Sequence[float],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    m = tuple(float(v) for v in (mean if mean is not None else default_mean))
    s = tuple(float(v) for v in (std if std is not None else default_std))
    for what, values in (("mean", m), ("std", s)):
        if len(values) not in (1, channels):
            raise BatchfitError(
                tr(
                    "--{what} has {n_values} values for images with {channels} channel(s)",
                    what=what,
                    n_values=len(values),
                    channels=channels,
                ),
                hint=tr("give one value, or one per channel ({channels})", channels=channels),
            )
    if any(v <= 0 for v in s):
        raise BatchfitError(tr("`std` must be positive, got {s}", s=s), hint=tr("e.g. `std=(0.5,)`"))
    # Normalize broadcasts a single value over channels; report one value per channel.
    return (m * channels if len(m) == 1 else m), (s * channels if len(s) == 1 else s)


def _resize(size: int | None) -> list[Any]:
    from torchvision import transforms

    return [] if size is None else [transforms.Resize(size), transforms.CenterCrop(size)]


def _load_preset(
    info: DatasetInfo,
    root: Path,
    split: str | None,
    download: bool,
    size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> LoadedDataset:
    from torchvision import transforms

    split = _check_split(split)
    cls = _torchvision_class(info)
    files = _REQUIRED_FILES[cls.__name__](cls, root)
    if not download:
        missing = [f for f in files if not f.is_file()]
        if missing:
            folder = os.path.commonpath([str(f.parent) for f in files])
            raise BatchfitError(
                tr("{name} is not in {root}: missing {missing} (expected in {folder}; torchvision needs all of {files})", name=info.name, root=root.resolve(), missing=', '.join(f.name for f in missing), folder=Path(folder).resolve(), files=', '.join(f.name for f in files)),
                hint=tr("add `download=True` to fetch it into {resolve}, or point `root` (or ${ENV_ROOT}) at the directory that holds it", resolve=root.resolve(), ENV_ROOT=ENV_ROOT),
            )
    m, s = _normalization(info.mean, info.std, mean, std, info.shape[0])
    pre = (*_resize(size), transforms.ToTensor())
    transform = transforms.Compose([*pre, transforms.Normalize(m, s)])
    if download:
        root.mkdir(parents=True, exist_ok=True)
    try:
        dataset = cls(root=str(root), train=SPLITS[split], download=download, transform=transform)
    except OSError as exc:  # URLError and socket errors are OSErrors
        raise BatchfitError(
            tr("could not download {name} into {resolve}: {exc}", name=info.name, resolve=root.resolve(), exc=exc),
            hint=tr("check the network connection, or place the files there by hand (see docs/data.md)"),
        ) from None
    except (RuntimeError, AssertionError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise BatchfitError(
            tr("the {name} files in {resolve} are incomplete or corrupted: {exc}", name=info.name, resolve=root.resolve(), exc=exc),
            hint=tr("delete {resolve} and fetch it again with `download=True`", resolve=files[0].parent.resolve()),
        ) from None
    classes = tuple(str(c) for c in getattr(dataset, "classes", info.classes))
    return LoadedDataset(
        name=info.name,
        source=f"torchvision.datasets.{cls.__name__}",
        split=split,
        root=root,
        dataset=dataset,
        mean=m,
        std=s,
        classes=classes,
        size=size,
        info=info,
        pre_transforms=pre,
    )


def _load_folder(
    path: Path,
    split: str | None,
    size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> LoadedDataset:
    from torchvision import datasets, transforms

    folder = path
    if split is not None:
        folder = path / split
        if not folder.is_dir():
            raise BatchfitError(
                tr("{path} has no {split!r} sub-folder", path=path, split=split), hint=tr("leave `split` out to use the folder as it is")
            )
    # ImageFolder's loader converts every image to RGB: three channels.
    m, s = _normalization((FOLDER_MEAN_STD,), (FOLDER_MEAN_STD,), mean, std, 3)
    pre = (*_resize(size), transforms.ToTensor())
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transforms.Compose([*pre, transforms.Normalize(m, s)]))
    except FileNotFoundError as exc:
        raise BatchfitError(
            tr("no images found in {folder}: {exc}", folder=folder, exc=exc),
            hint=tr("the folder needs one sub-folder per class with image files in it (e.g. cats/1.png, dogs/2.png)"),
        ) from None
    return LoadedDataset(
        name=str(path),
        source="torchvision.datasets.ImageFolder",
        split=split,
        root=folder,
        dataset=dataset,
        mean=m,
        std=s,
        classes=tuple(dataset.classes),
        size=size,
        pre_transforms=pre,
    )


# --- showing images ----------------------------------------------------------------------------------


def denormalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize``: ``img * std + mean`` per channel (the seed's ``img * 0.3081 + 0.1307``).

    >>> denormalize(torch.zeros(1, 2, 2), (0.1307,), (0.3081,))[0, 0, 0].item()
    0.1307...
    >>> denormalize(torch.full((3, 1, 1), -1.0), (0.5,) * 3, (0.5,) * 3).flatten().tolist()
    [0.0, 0.0, 0.0]
    """
    m = torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
    return img * s + m


def to_hwc(img: torch.Tensor) -> Any:
    """(C, H, W) tensor -> (H, W, C) numpy array, the layout matplotlib's ``imshow`` wants.

    >>> to_hwc(torch.zeros(3, 32, 32)).shape
    (32, 32, 3)
    """
    return img.permute(1, 2, 0).numpy()


def sample_indices(num_samples: int, n: int, seed: int = DEFAULT_GRID_SEED) -> list[int]:
    """``n`` distinct random indices, the same for the same seed.

    >>> sample_indices(10, 3, seed=0) == sample_indices(10, 3, seed=0)
    True
    """
    if n < 1:
        raise BatchfitError(tr("the grid needs at least one image, not {n}", n=n), hint=tr("e.g. 16 (`batchfit show --grid 0` draws none)"))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_samples, generator=generator)[: min(n, num_samples)].tolist()


def sample_grid(
    data: LoadedDataset,
    n: int = 16,
    seed: int = DEFAULT_GRID_SEED,
    *,
    ncols: int | None = None,
    interactive: bool = False,
) -> Figure:
    """A grid of ``n`` random samples with their class names, denormalised, channels last.

    The figure is a plain ``matplotlib.figure.Figure`` (Agg canvas, no window, no pyplot state)
    unless ``interactive=True`` (then it comes from pyplot, for ``plt.show()``). Pixels are drawn
    unsmoothed (``interpolation="nearest"``) on a fixed 0..1 scale.
    """
    indices = sample_indices(len(data), n, seed)
    ncols = ncols or math.ceil(math.sqrt(len(indices)))
    nrows = math.ceil(len(indices) / ncols)
    figsize = (1.6 * ncols, 1.8 * nrows)
    if interactive:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize, layout="constrained")
    else:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
    for k, index in enumerate(indices):
        img, label = data.dataset[index]
        pixels = to_hwc(denormalize(img, data.mean, data.std).clamp(0.0, 1.0))
        ax = fig.add_subplot(nrows, ncols, k + 1)
        if pixels.shape[2] == 1:
            ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(data.classes[int(label)], fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{data.name} ({data.split or 'folder'}): {len(indices)} random samples, seed {seed}", fontsize=9)
    return fig


def display_available() -> bool:
    """Whether matplotlib found an interactive backend (it falls back to Agg without a display)."""
    import matplotlib
    from matplotlib.backends.registry import BackendFilter, backend_registry

    return matplotlib.get_backend().lower() not in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE)


# --- statistics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and (population) std of pixel values in [0, 1], before normalisation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_samples: int
    pixels_per_channel: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "num_samples": self.num_samples,
            "pixels_per_channel": self.pixels_per_channel,
        }

    def __str__(self) -> str:
        return f"mean {_fmt_tuple(self.mean)}, std {_fmt_tuple(self.std)}"


def channel_stats(
    data: LoadedDataset,
    batch_size: int = 1000,
    num_workers: int = 0,
    progress: bool | Progress = False,
    *,
    use_array: bool = True,
) -> ChannelStats:
    """Mean and std per channel over the whole split, in one streaming pass.

    Each chunk's mean and sum of squared deviations are taken in float64 and merged with Chan et
    al.'s pairwise update, so no sum of squares of millions of values is ever subtracted.
    MNIST/CIFAR-10 (no ``--size``) are read straight from the dataset's uint8 array (``/ 255``);
    with ``use_array=False``, or for folders, every sample goes through ``ToTensor`` in a
    DataLoader (measured here for 60,000 MNIST-sized images: 33 s for the whole command that way,
    under 6 s from the array).
    Real MNIST train gives mean 0.1307, std 0.3081 (the seed's constants; see docs/data.md).
    """
    array = _uint8_images(data) if use_array else None
    total = len(data)
    batches: Iterable[torch.Tensor]
    if array is not None:
        batches = (_chunk_nchw(array[i : i + batch_size]) for i in range(0, total, batch_size))
    else:
        from torch.utils.data import DataLoader

        loader = DataLoader(data.unnormalized(), batch_size=batch_size, shuffle=False, num_workers=num_workers)
        batches = (images for images, _labels in loader)
    count = 0
    samples = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    bar, owned = _progress(progress)
    task = bar.add_task(f"{data.name}: channel statistics", total=total) if bar is not None else None
    try:
        for images in batches:
            x = images.to(torch.float64)
            if array is not None:
                x = x / 255.0  # what ToTensor does, here in float64
            per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
            n_b = per_channel.shape[1]
            mean_b = per_channel.mean(dim=1)
            m2_b = ((per_channel - mean_b[:, None]) ** 2).sum(dim=1)
            if mean is None or m2 is None:
                mean, m2 = mean_b, m2_b
            else:
                delta = mean_b - mean
                merged = count + n_b
                mean = mean + delta * (n_b / merged)
                m2 = m2 + m2_b + delta**2 * (count * n_b / merged)
            count += n_b
            samples += images.shape[0]
            if bar is not None and task is not None:
                bar.advance(task, images.shape[0])
    finally:
        if owned and bar is not None:
            bar.stop()
    if mean is None or m2 is None:
        raise BatchfitError(tr("{name} has no samples", name=data.name), hint=tr("check the folder or split"))
    std = torch.sqrt(m2 / count)
    return ChannelStats(tuple(mean.tolist()), tuple(std.tolist()), samples, count)


def _uint8_images(data: LoadedDataset) -> Any:
    """The dataset's in-RAM uint8 image array when it is exactly what ToTensor would see, else None."""
    array = getattr(data.dataset, "data", None)
    if data.size is not None or array is None or str(array.dtype) not in ("uint8", "torch.uint8"):
        return None
    return array if array.ndim in (3, 4) else None


def _chunk_nchw(chunk: Any) -> torch.Tensor:
    # MNIST keeps (N, H, W); CIFAR-10 keeps (N, H, W, C), channels last, like PIL.
    x = torch.as_tensor(chunk)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _progress(progress: bool | Progress) -> tuple[Progress | None, bool]:
    if progress is False:
        return None, False
    if progress is True:
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        bar.start()
        return bar, True
    return progress, False


# --- host memory -------------------------------------------------------------------------------------


def _pow2ceil(n: int) -> int:
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class HostMemory:
    """Host RAM a DataLoader holds for one configuration (bytes as ints).

    Batches in flight: ``num_workers * prefetch_factor``, or 1 with no workers. Each batch is the
    float32 images plus int64 labels; with ``pin_memory`` every batch in flight also has a pinned
    copy, which PyTorch's CUDA caching host allocator rounds up to a power of two per tensor
    (aten/src/ATen/core/CachingHostAllocator.h). The dataset object's own arrays come on top
    (MNIST/CIFAR-10 keep every image in RAM; ImageFolder reads files per item).

    >>> m = host_memory("cifar10", 256, num_workers=4, pin_memory=True)
    >>> m.batches_in_flight, m.batch_image_bytes, m.pinned_bytes_per_batch
    (8, 3145728, 4196352)
    """

    dataset: str
    batch_size: int
    num_workers: int
    prefetch_factor: int | None
    pin_memory: bool
    batches_in_flight: int
    batch_image_bytes: int
    batch_label_bytes: int
    pinned_bytes_per_batch: int
    dataset_image_bytes: int
    dataset_label_bytes: int

    @property
    def batch_bytes(self) -> int:
        return self.batch_image_bytes + self.batch_label_bytes

    @property
    def in_flight_bytes(self) -> int:
        return self.batches_in_flight * self.batch_bytes

    @property
    def pinned_bytes(self) -> int:
        return self.batches_in_flight * self.pinned_bytes_per_batch

    @property
    def total_bytes(self) -> int:
        return sum(self.breakdown().values())

    def breakdown(self) -> dict[str, int]:
        """Where the host RAM goes; the values add up to :attr:`total_bytes`."""
        return {
            "dataset_images": self.dataset_image_bytes,
            "dataset_labels": self.dataset_label_bytes,
            "batches_in_flight": self.in_flight_bytes,
            "pinned_copies": self.pinned_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "prefetch_factor": self.prefetch_factor,
            "pin_memory": self.pin_memory,
            "batches_in_flight": self.batches_in_flight,
            "batch_image_bytes": self.batch_image_bytes,
            "batch_label_bytes": self.batch_label_bytes,
            "pinned_bytes_per_batch": self.pinned_bytes_per_batch,
            "breakdown": self.breakdown(),
            "total_bytes": self.total_bytes,
        }

    def __str__(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in self.breakdown().items() if v)
        return f"host RAM {format_bytes(self.total_bytes)} ({parts})"


def host_memory(
    dataset: str | DatasetInfo | LoadedDataset,
    batch_size: int,
    *,
    split: str = "train",
    num_workers: int = 0,
    prefetch_factor: int | None = None,
    pin_memory: bool = False,
) -> HostMemory:
    """Host RAM a ``DataLoader(dataset, batch_size, num_workers, prefetch_factor, pin_memory)`` holds.

    ``dataset`` may be a preset name or :class:`DatasetInfo` (static facts, no files needed: call
    it next to a GPU estimate) or a :class:`LoadedDataset` (its real arrays). A batch larger than
    the dataset holds the whole dataset, as a DataLoader would yield it.
    """
    if batch_size < 1:
        raise BatchfitError(tr("`batch_size` must be at least 1, not {batch_size}", batch_size=batch_size), hint=tr("e.g. `batch_size=64`"))
    if num_workers < 0:
        raise BatchfitError(tr("`num_workers` must be 0 or more, not {num_workers}", num_workers=num_workers), hint=tr("e.g. `num_workers=4`"))
    if prefetch_factor is not None and (num_workers == 0 or prefetch_factor < 1):
        raise BatchfitError(
            tr("prefetch_factor={prefetch_factor} needs worker processes (num_workers={num_workers})", prefetch_factor=prefetch_factor, num_workers=num_workers),
            hint=tr("give `num_workers` 1 or more, or leave `prefetch_factor` out (DataLoader's own rule)"),
        )
    if isinstance(dataset, LoadedDataset):
        name = dataset.name
        num_samples = len(dataset)
        sample_bytes = dataset.tensor_bytes_per_sample
        ram_images, ram_labels = dataset.ram_image_bytes, dataset.ram_label_bytes
    else:
        info = get_dataset(dataset) if isinstance(dataset, str) else dataset
        split = _check_split(split)
        name = info.name
        num_samples = info.train_size if SPLITS[split] else info.test_size
        sample_bytes = info.float32_bytes_per_sample
        ram_images = num_samples * info.stored_bytes_per_sample if info.images_in_ram else 0
        ram_labels = LABEL_BYTES * num_samples
    rows = min(batch_size, num_samples)
    factor = (prefetch_factor or 2) if num_workers > 0 else None
    in_flight = num_workers * factor if factor is not None else 1
    images, labels = rows * sample_bytes, rows * LABEL_BYTES
    return HostMemory(
        dataset=name,
        batch_size=batch_size,
        num_workers=num_workers,
        prefetch_factor=factor,
        pin_memory=pin_memory,
        batches_in_flight=in_flight,
        batch_image_bytes=images,
        batch_label_bytes=labels,
        pinned_bytes_per_batch=_pow2ceil(images) + _pow2ceil(labels) if pin_memory else 0,
        dataset_image_bytes=ram_images,
        dataset_label_bytes=ram_labels,
    )


# --- the report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRow:
    """One batch size: shapes and bytes as stored, on the device, and in host RAM."""

    batch_size: int
    batch_shape: tuple[int, ...]  # (N, C, H, W); N is smaller when the dataset is
    batches_per_epoch: int
    stored_bytes: int  # N samples as stored (uint8)
    input_bytes: int  # the input batch on the device: N * float32 bytes per sample
    label_bytes: int  # int64 labels on the device
    host: HostMemory

    def to_dict(self) -> dict[str, Any]:
        host = self.host.to_dict()
        del host["schema_version"], host["dataset"], host["batch_size"]
        return {
            "batch_size": self.batch_size,
            "batch_shape": list(self.batch_shape),
            "batches_per_epoch": self.batches_per_epoch,
            "stored_bytes": self.stored_bytes,
            "input_bytes": self.input_bytes,
            "label_bytes": self.label_bytes,
            "host_memory": host,
        }


@dataclass(frozen=True)
class GridInfo:
    """Which samples a grid showed, and where it was saved."""

    indices: tuple[int, ...]
    labels: tuple[int, ...]
    seed: int
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"indices": list(self.indices), "labels": list(self.labels), "seed": self.seed, "path": self.path}


@dataclass(frozen=True)
class DatasetReport(Rendered):
    """What the lesson teaches about a dataset; renders itself (text, rich) and has :meth:`to_dict`."""

    name: str
    source: str
    root: str
    split: str | None
    num_samples: int
    classes: tuple[str, ...]
    sample_shape: tuple[int, ...]
    sample_dtype: str
    probe_batch_shape: tuple[int, ...]  # a real batch drawn from a DataLoader
    label_dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    range_before: tuple[float, float]  # observed in the probe batch, ToTensor only
    range_after: tuple[float, float]  # the same batch after Normalize
    stored_dtype: str
    stored_bytes_per_sample: int
    tensor_bytes_per_sample: int
    size: int | None
    rows: tuple[BatchRow, ...]
    stats: ChannelStats | None = None
    grid: GridInfo | None = None

    @property
    def range_after_bounds(self) -> tuple[tuple[float, float], ...]:
        """Per channel, where 0 and 1 land after Normalize: ((0 - mean) / std, (1 - mean) / std)."""
        return tuple(((0 - m) / s, (1 - m) / s) for m, s in zip(self.mean, self.std, strict=True))

    def with_grid(self, grid: GridInfo) -> DatasetReport:
        return replace(self, grid=grid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.name,
            "source": self.source,
            "root": self.root,
            "split": self.split,
            "num_samples": self.num_samples,
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "size": self.size,
            "sample": {"shape": list(self.sample_shape), "dtype": self.sample_dtype},
            "batch": {
                "shape": list(self.probe_batch_shape),
                "dtype": self.sample_dtype,
                "labels_shape": [self.probe_batch_shape[0]],
                "labels_dtype": self.label_dtype,
            },
            "normalize": {"mean": list(self.mean), "std": list(self.std)},
            "value_range": {
                "before": list(self.range_before),
                "after": list(self.range_after),
                "after_bounds": [list(b) for b in self.range_after_bounds],
            },
            "stored_dtype": self.stored_dtype,
            "stored_bytes_per_sample": self.stored_bytes_per_sample,
            "tensor_bytes_per_sample": self.tensor_bytes_per_sample,
            "batches": [row.to_dict() for row in self.rows],
            "stats": self.stats.to_dict() if self.stats is not None else None,
            "grid": self.grid.to_dict() if self.grid is not None else None,
        }

    def sections(self) -> list[Section]:
        """A heading, the facts, the table by batch size, and what its columns mean."""
        where = f"{self.split} split" if self.split else "folder"
        heading = Text(f"{self.name} - {where}, {self.source}, from {self.root}", style="bold")
        facts: list[tuple[str, str]] = []
        resize = f"Resize({self.size}) + CenterCrop({self.size}) + " if self.size else ""
        n = self.probe_batch_shape[0]
        bounds = ", ".join(f"[{lo:.4f}, {hi:.4f}]" for lo, hi in self.range_after_bounds)
        for key, value in (
            ("samples", f"{self.num_samples:,}"),
            ("classes", f"{len(self.classes)}: {_shorten(', '.join(self.classes))}"),
            ("one sample", f"(C, H, W) = {_shape(self.sample_shape)} {self.sample_dtype}"),
            (
                "one batch",
                f"(N, C, H, W) = {_shape(self.probe_batch_shape)} {self.sample_dtype}, labels ({n},) "
                f"{self.label_dtype}, from DataLoader(batch_size={n})",
            ),
            (
                "transform",
                f"{resize}ToTensor() + Normalize(mean={_fmt_tuple(self.mean)}, std={_fmt_tuple(self.std)})",
            ),
            (
                "values",
                f"[{self.range_before[0]:.4f}, {self.range_before[1]:.4f}] after ToTensor (0..255 -> 0..1), "
                f"[{self.range_after[0]:.4f}, {self.range_after[1]:.4f}] after Normalize "
                f"(0..1 -> {bounds} per channel)",
            ),
            (
                "bytes/sample",
                f"{format_bytes(self.stored_bytes_per_sample, 'B')} stored ({self.stored_dtype}), "
                f"{format_bytes(self.tensor_bytes_per_sample, 'B')} as a {self.sample_dtype} tensor",
            ),
        ):
            facts.append((key, value))
        if self.stats is not None:
            facts.append(
                (
                    "pixel stats",
                    f"{self.stats} over {self.stats.num_samples:,} samples "
                    f"({self.stats.pixels_per_channel:,} values per channel, before Normalize)",
                )
            )
        if self.grid is not None and self.grid.path:
            facts.append(
                ("grid", f"{len(self.grid.indices)} samples (seed {self.grid.seed}) saved to {self.grid.path}")
            )
        columns = ["batch", "(N, C, H, W)", "per epoch", "stored", "on device", "labels", "host RAM"]
        rows = [
            [
                str(row.batch_size),
                _shape(row.batch_shape),
                f"{row.batches_per_epoch:,}",
                format_bytes(row.stored_bytes),
                format_bytes(row.input_bytes),
                format_bytes(row.label_bytes),
                format_bytes(row.host.total_bytes),
            ]
            for row in self.rows
        ]
        right = [i != 1 for i in range(len(columns))]
        notes = [
            f"per epoch: batches; stored: N samples as {self.stored_dtype}; on device: the input batch the GPU holds "
            f"(N x {format_bytes(self.tensor_bytes_per_sample, 'B')}, {self.sample_dtype}); labels: {self.label_dtype}"
        ]
        if self.rows:
            host = self.rows[0].host
            workers = (
                f"{host.num_workers} workers x prefetch_factor {host.prefetch_factor}"
                if host.num_workers
                else "no workers"
            )
            pinned = ", each also pinned (power-of-two blocks)" if host.pin_memory else ""
            plural = "es" if host.batches_in_flight != 1 else ""
            notes.append(
                f"host RAM: the dataset's arrays ({format_bytes(host.dataset_image_bytes)} images + "
                f"{format_bytes(host.dataset_label_bytes)} labels) + {host.batches_in_flight} batch{plural} "
                f"in flight ({workers}){pinned}"
            )
        return [heading, Facts(facts), Table("", columns, rows, right=right, footer=notes)]


def describe(
    data: LoadedDataset | str | Path,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    num_workers: int = 0,
    prefetch_factor: int | None = None,
    pin_memory: bool = False,
    stats: bool = False,
    progress: bool | Progress = False,
) -> DatasetReport:
    """Shapes, value ranges, classes, bytes per sample and per batch, host RAM, optional statistics.

    A string is loaded with :func:`load_dataset`'s defaults. One real batch (at most 64 samples) is
    drawn from a DataLoader to show the shape it yields and the value ranges.
    """
    from torch.utils.data import DataLoader

    if isinstance(data, (str, Path)):
        data = load_dataset(data)
    if not batch_sizes:
        raise BatchfitError(tr("no batch sizes given"), hint=tr("e.g. `batch_sizes=(64, 256, 1024, 4096)`"))
    num = len(data)
    if num == 0:
        raise BatchfitError(tr("{name} has no samples", name=data.name), hint=tr("check the folder or split"))
    probe = min(min(batch_sizes), num, 64)
    # Same first samples through both transforms: the values before and after Normalize.
    try:
        normalized, labels = next(iter(DataLoader(data.dataset, batch_size=probe, shuffle=False)))
        raw, _ = next(iter(DataLoader(data.unnormalized(), batch_size=probe, shuffle=False)))
    except RuntimeError as exc:  # default_collate cannot stack images of different sizes
        raise BatchfitError(
            tr("the images in {name} have different sizes, so a DataLoader cannot batch them ({exc})", name=data.name, exc=exc),
            hint=tr("give `size=N` to resize and centre-crop them all to N x N"),
        ) from None
    rows = []
    for bs in batch_sizes:
        host = host_memory(data, bs, num_workers=num_workers, prefetch_factor=prefetch_factor, pin_memory=pin_memory)
        n = min(bs, num)
        rows.append(
            BatchRow(
                batch_size=bs,
                batch_shape=(n, *data.sample_shape),
                batches_per_epoch=math.ceil(num / bs),
                stored_bytes=n * data.stored_bytes_per_sample,
                input_bytes=host.batch_image_bytes,
                label_bytes=host.batch_label_bytes,
                host=host,
            )
        )
    data_array = getattr(data.dataset, "data", None)
    stored_dtype = str(getattr(data_array, "dtype", "uint8")).removeprefix("torch.")
    return DatasetReport(
        name=data.name,
        source=data.source,
        root=str(data.root.resolve()),
        split=data.split,
        num_samples=num,
        classes=data.classes,
        sample_shape=data.sample_shape,
        sample_dtype=str(data.first_sample.dtype).removeprefix("torch."),
        probe_batch_shape=tuple(normalized.shape),
        label_dtype=str(labels.dtype).removeprefix("torch."),
        mean=data.mean,
        std=data.std,
        range_before=(float(raw.min()), float(raw.max())),
        range_after=(float(normalized.min()), float(normalized.max())),
        stored_dtype=stored_dtype,
        stored_bytes_per_sample=data.stored_bytes_per_sample,
        tensor_bytes_per_sample=data.tensor_bytes_per_sample,
        size=data.size,
        rows=tuple(rows),
        stats=channel_stats(data, num_workers=num_workers, progress=progress) if stats else None,
    )


# --- small text helpers ---------------------------------------------------------------------------


def _fmt_tuple(values: Sequence[float]) -> str:
    inner = ", ".join(f"{v:.4f}" for v in values)
    return f"({inner},)" if len(values) == 1 else f"({inner})"


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "DEFAULT_BATCH_SIZES",
    "BatchRow",
    "ChannelStats",
    "DatasetReport",
    "GridInfo",
    "HostMemory",
    "LoadedDataset",
    "channel_stats",
    "default_root",
    "denormalize",
    "describe",
    "display_available",
    "host_memory",
    "load_dataset",
    "required_files",
    "sample_grid",
    "sample_indices",
    "to_hwc",
]
