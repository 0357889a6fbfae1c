"""Task data: files through HF `datasets`, image folders, Fashion-MNIST, WordNet supersenses.

Every loader returns a plain torch `Dataset` whose items are dicts with canonical keys
(`text`, `image`, `question`, `answer`, `label`), whatever the columns were called on disk, so
the model's collate function (trainers/models.py) is the only place that knows about tokenizers
and pixel formats. Subsampling with `limit` is seeded and therefore the same on every run.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from adapterdb.errors import AdbError
from adapterdb.trainers.config import DataSpec
from adapterdb.trainers.textdata import LEXNAMES, load_supersenses, wordnet_folder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CANONICAL = ("text", "image", "question", "answer")


class ExampleDataset(Dataset):
    """A list-like data set of dicts; `labels` (when the task has them) is a LongTensor."""

    def __init__(self, fetch: Any, size: int, labels: torch.Tensor | None) -> None:
        self._fetch, self._size, self.labels = fetch, size, labels

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._fetch(index)
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item


@dataclass(frozen=True)
class TaskData:
    """The two splits of a task, plus the class names that define label ids 0..k-1."""

    train: ExampleDataset
    eval: ExampleDataset | None
    label_names: tuple[str, ...] | None

    @property
    def num_classes(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)


def load_task_data(spec: DataSpec, seed: int = 0) -> TaskData:
    """Both splits of the task described by `data:` in a task file."""
    if spec.builtin == "fashion-mnist":
        classes = spec.classes or list(range(10))
        folder = fashion_mnist_folder(spec.folder)
        names = tuple(FASHION_MNIST_CLASSES[c] for c in classes)
        train, evl = (
            load_fashion_mnist(folder, split, classes, spec.split_limit(split), seed)
            for split in ("train", "eval")
        )
        return TaskData(train, evl, names)
    if spec.builtin == "wordnet-supersenses":
        return load_wordnet_supersenses(spec, seed)
    train_hf = _hf_split(spec, spec.train)
    eval_hf = None if spec.eval is None else _hf_split(spec, spec.eval)
    names = _label_names(train_hf, spec.label) if spec.label in train_hf.column_names else None
    train = _records(train_hf, spec, names, seed, spec.train.parent, spec.split_limit("train"))
    evl = (
        None
        if eval_hf is None
        else _records(eval_hf, spec, names, seed, spec.eval.parent, spec.split_limit("eval"))
    )
    return TaskData(train, evl, names)


# --- idx files and Fashion-MNIST ----------------------------------------------------------


def read_idx(path: str | Path) -> torch.Tensor:
    """An idx file (MNIST format: magic 0 0 type ndim, big-endian uint32 dims, data) as a tensor.

    Gzipped files are recognised by their content, not their name.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise AdbError(f"{path}: not an idx file (bad magic number); use the original idx files")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(dims) != ndim or len(raw) != header + math.prod(dims) * dtype.itemsize:
        raise AdbError(f"{path}: idx file is truncated or has trailing bytes; download it again")
    array = np.frombuffer(raw, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(dims))


def fashion_mnist_folder(folder: Path | None = None) -> Path:
    """`data.folder`, else $ADB_FASHION_MNIST, else where Debian's package installs the files."""
    if folder is not None:
        return folder
    return Path(os.environ.get("ADB_FASHION_MNIST", FASHION_MNIST_DEBIAN))


def load_fashion_mnist(
    folder: Path, split: str, classes: Sequence[int], limit: int | None = None, seed: int = 0
) -> ExampleDataset:
    """Fashion-MNIST `split` ('train' / 'eval') restricted to `classes`, relabelled 0..k-1."""
    images, labels = (read_idx(_fashion_file(folder, name)) for name in _FASHION_FILES[split])
    keep, relabelled = select_classes(labels.long(), classes)
    chosen = subsample(len(keep), limit, seed)
    keep, relabelled = keep[chosen], relabelled[chosen]
    images = images[keep].unsqueeze(1)  # (N, 1, 28, 28) uint8: preprocessing happens per batch
    return ExampleDataset(lambda i: {"image": images[i]}, len(keep), relabelled)


def _fashion_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise AdbError(
        f"Fashion-MNIST file {name}(.gz) not found in {folder}; put the four idx files there "
        f"or set data.folder / ADB_FASHION_MNIST (`apt-get install dataset-fashion-mnist` "
        f"installs them in {FASHION_MNIST_DEBIAN})"
    )


def select_classes(
    labels: torch.Tensor, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the examples whose label is in `classes`, and their labels renumbered 0..k-1
    in the order `classes` lists them (so `classes: [6, 0]` makes Shirt class 0)."""
    wanted = torch.as_tensor(list(classes), dtype=torch.long)
    match = labels.unsqueeze(1) == wanted.unsqueeze(0)  # (N, k), k = a handful of classes
    keep = torch.nonzero(match.any(dim=1)).squeeze(1)
    return keep, match[keep].int().argmax(dim=1)


def subsample(n: int, limit: int | None, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded random subset of size min(n, limit) (all of range(n) if None)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:limit].sort().values


# --- WordNet supersenses (trainers/textdata.py) -------------------------------------------


def load_wordnet_supersenses(spec: DataSpec, seed: int = 0) -> TaskData:
    """Both splits of a WordNet supersense task; classes by name, all 45 when not given."""
    classes = [str(c) for c in spec.classes] if spec.classes else list(LEXNAMES)
    folder = wordnet_folder(spec.folder)
    splits = []
    for split in ("train", "eval"):
        texts, labels = load_supersenses(folder, split, classes, spec.split_limit(split), seed)
        ids = torch.tensor(labels, dtype=torch.long)
        splits.append(ExampleDataset(lambda i, t=texts: {"text": t[i]}, len(texts), ids))
    return TaskData(splits[0], splits[1], tuple(classes))


# --- files through HF datasets ------------------------------------------------------------


def _hf_split(spec: DataSpec, path: Path) -> Any:
    """One local file (or image folder) as an HF Dataset; `datasets` reads local files offline."""
    from datasets import load_dataset  # slow to import (~1 s) and only needed for file data

    if not path.exists():
        raise AdbError(f"data file {path} does not exist; fix data.train / data.eval")
    fmt = spec.file_format
    builder = "json" if fmt in ("jsonl", "json") else fmt
    source = {"data_dir": str(path)} if fmt == "imagefolder" else {"data_files": str(path)}
    dataset = load_dataset(builder, split="train", **source)
    for column in _columns(spec).values():
        if column not in dataset.column_names:
            raise AdbError(
                f"{path}: no column {column!r}; use one of {', '.join(dataset.column_names)}"
            )
    return dataset


def _columns(spec: DataSpec) -> dict[str, str]:
    """Canonical key -> column name on disk, for the inputs this task uses."""
    columns = {key: getattr(spec, key) for key in _CANONICAL if getattr(spec, key) is not None}
    if spec.file_format == "imagefolder":
        columns.setdefault("image", "image")
    return columns


def _label_values(dataset: Any, column: str) -> list[Any]:
    """Label column values, with ClassLabel ids turned into their names (so splits agree)."""
    values = list(dataset[column])
    names = getattr(dataset.features[column], "names", None)
    return [names[v] for v in values] if names else values


def _label_names(dataset: Any, column: str) -> tuple[str, ...]:
    """Class names in id order: integer labels keep their ids, other labels are sorted."""
    values = set(_label_values(dataset, column))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise AdbError(f"label column {column!r} has negative ids; use ids 0..k-1")
        return tuple(str(i) for i in range(max(values) + 1))
    return tuple(sorted(str(v) for v in values))


def _records(
    dataset: Any,
    spec: DataSpec,
    names: tuple[str, ...] | None,
    seed: int,
    folder: Path,
    limit: int | None,
) -> ExampleDataset:
    """An HF Dataset as canonical dicts, subsampled, labels mapped through the train names;
    image paths in the rows are relative to `folder` (the data file's)."""
    rows = subsample(len(dataset), limit, seed).tolist()
    dataset = dataset.select(rows)
    labels = None if names is None else _label_ids(dataset, spec.label, names)
    columns = _columns(spec)

    def fetch(index: int) -> dict[str, Any]:
        row = dataset[index]
        return {
            key: _to_tensor(row[col], folder) if key == "image" else row[col]
            for key, col in columns.items()
        }

    return ExampleDataset(fetch, len(dataset), labels)


def _label_ids(dataset: Any, column: str, names: tuple[str, ...]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(names)}
    values = [str(v) for v in _label_values(dataset, column)]
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise AdbError(f"label {unknown[0]!r} is not in the train split; use train's labels")
    return torch.tensor([index[v] for v in values], dtype=torch.long)


def _to_tensor(image: Any, folder: Path) -> torch.Tensor:
    """A PIL image, or an image path relative to the data file's folder, as uint8 (C, H, W):
    grayscale keeps 1 channel, everything else becomes RGB."""
    if isinstance(image, str):
        from PIL import Image

        image = Image.open(folder / image)
    image = image if image.mode == "L" else image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).reshape(image.height, image.width, -1).permute(2, 0, 1)


# --- image preprocessing ------------------------------------------------------------------


def preprocess_images(
    images: Sequence[torch.Tensor] | torch.Tensor,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Images (uint8 0..255 or float 0..1; (H, W), (1, H, W) or (3, H, W)) -> a float32 batch
    (B, 3, size, size), normalised; grayscale is repeated to 3 channels for RGB-trained nets.

    Resizing is bilinear with antialiasing via `F.interpolate` (torchvision has no CPU build
    here). Same-sized images are resized in one call; mixed sizes one by one.
    """
    chw = [_as_chw(image) for image in images]
    if all(image.shape == chw[0].shape for image in chw):
        batch = _resize(torch.stack(chw), size)
    else:
        batch = torch.cat([_resize(image[None], size) for image in chw])
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def _as_chw(image: torch.Tensor) -> torch.Tensor:
    """(H, W) / (C, H, W) uint8 or float -> float32 (3, H, W) in 0..1."""
    image = image[None] if image.dim() == 2 else image
    image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    return image[:3].expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(
        batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


def carve_validation(data: TaskData, fraction: float, seed: int = 0) -> TaskData:
    """The training split cut in two, seeded: the rest to train on, `fraction` of it (at least
    one example) as the eval split. The task's own eval split is set aside untouched."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    held = max(1, min(len(order) - 1, round(fraction * len(order))))
    return TaskData(
        _subset(data.train, order[held:].sort().values),
        _subset(data.train, order[:held].sort().values),
        data.label_names,
    )


def _subset(dataset: ExampleDataset, index: torch.Tensor) -> ExampleDataset:
    labels = None if dataset.labels is None else dataset.labels[index]
    rows = index.tolist()
    return ExampleDataset(lambda i: dataset._fetch(rows[i]), len(rows), labels)
