"""Data loading: idx reader, Fashion-MNIST split helper, files through `datasets`, images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakedata import IDX_TYPES, write_idx
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import AdbError
from adapterdb.trainers.config import DataSpec
from adapterdb.trainers.data import (
    FASHION_MNIST_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_task_data,
    preprocess_images,
    read_idx,
    select_classes,
    subsample,
)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(sorted(IDX_TYPES)),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    compress=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_idx_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    dtype: str,
    shape: list[int],
    compress: bool,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_idx(tmp_path_factory.mktemp("idx") / "x.idx", array, compress)
    tensor = read_idx(path)
    assert tuple(tensor.shape) == tuple(shape)
    assert tensor.numpy().dtype == np.dtype(dtype)
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_idx_rejects_bad_magic_and_truncation(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(AdbError, match="bad magic number"):
        read_idx(tmp_path / "bad")
    good = write_idx(tmp_path / "good", np.arange(6, dtype="int32").reshape(2, 3))
    (tmp_path / "cut").write_bytes(good.read_bytes()[:-1])
    with pytest.raises(AdbError, match="truncated"):
        read_idx(tmp_path / "cut")


def _reference_select(labels: list[int], classes: list[int]) -> tuple[list[int], list[int]]:
    keep = [i for i, y in enumerate(labels) if y in classes]
    return keep, [classes.index(labels[i]) for i in keep]


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), max_size=40),
    classes=st.lists(st.integers(0, 9), min_size=1, max_size=5, unique=True),
)
def test_select_classes_matches_reference(labels: list[int], classes: list[int]) -> None:
    keep, relabelled = select_classes(torch.tensor(labels, dtype=torch.long), classes)
    want_keep, want_labels = _reference_select(labels, classes)
    assert keep.tolist() == want_keep
    assert relabelled.tolist() == want_labels


def test_subsample_is_seeded_sorted_and_bounded() -> None:
    a, b = subsample(100, 10, seed=3), subsample(100, 10, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, subsample(100, 10, seed=4))
    assert len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist())
    assert torch.equal(subsample(5, 10), torch.arange(5))
    assert torch.equal(subsample(5, None), torch.arange(5))


def _fake_fashion(folder: Path, n: int, compress: bool) -> tuple[np.ndarray, np.ndarray]:
    """A tiny Fashion-MNIST: image i is filled with value i, labels cycle 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.repeat(np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if compress else ""
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_classes_relabel_and_limit(tmp_path: Path, compress: bool) -> None:
    _fake_fashion(tmp_path / "fm", 60, compress)
    spec = DataSpec(builtin="fashion-mnist", classes=[6, 0], folder=tmp_path / "fm")
    data = load_task_data(spec)
    assert data.label_names == (FASHION_MNIST_CLASSES[6], FASHION_MNIST_CLASSES[0])
    assert data.num_classes == 2
    assert len(data.train) == 12 and len(data.eval) == 12
    for i in range(len(data.train)):
        item = data.train[i]
        original = int(item["image"][0, 0, 0])  # image value = original index
        assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.uint8
        assert item["label"] == [6, 0].index(original % 10)
    limited = load_task_data(spec.model_copy(update={"limit": 5}))
    again = load_task_data(spec.model_copy(update={"limit": 5}))
    assert len(limited.train) == 5
    picked = [int(limited.train[i]["image"][0, 0, 0]) for i in range(5)]
    assert picked == [int(again.train[i]["image"][0, 0, 0]) for i in range(5)]


def test_fashion_mnist_folder_from_env_and_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_fashion(tmp_path / "env", 20, compress=True)
    monkeypatch.setenv("ADB_FASHION_MNIST", str(tmp_path / "env"))
    data = load_task_data(DataSpec(builtin="fashion-mnist", classes=[1, 2]))
    assert len(data.train) == 4
    monkeypatch.setenv("ADB_FASHION_MNIST", str(tmp_path / "empty"))
    with pytest.raises(AdbError, match="apt-get install dataset-fashion-mnist") as info:
        load_task_data(DataSpec(builtin="fashion-mnist", classes=[1, 2]))
    assert "ADB_FASHION_MNIST" in str(info.value) and str(tmp_path / "empty") in str(info.value)


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_text_classification_with_string_labels(tmp_path: Path) -> None:
    train = [{"body": f"text {i}", "topic": t} for i, t in enumerate("ccabab")]
    _jsonl(tmp_path / "train.jsonl", train)
    _jsonl(tmp_path / "eval.jsonl", [{"body": "x", "topic": "b"}, {"body": "y", "topic": "c"}])
    spec = DataSpec(
        train=tmp_path / "train.jsonl", eval=tmp_path / "eval.jsonl", text="body", label="topic"
    )
    data = load_task_data(spec)
    assert data.label_names == ("a", "b", "c")
    assert [data.train[i] for i in range(2)] == [
        {"text": "text 0", "label": 2},
        {"text": "text 1", "label": 2},
    ]
    assert data.train.labels.tolist() == [2, 2, 0, 1, 0, 1]
    assert data.eval.labels.tolist() == [1, 2]
    limited = load_task_data(spec.model_copy(update={"limit": 3}))
    assert len(limited.train) == 3 and len(limited.eval) == 2


def test_csv_int_labels_and_errors(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("sentence,y\nhello,0\nworld,2\nagain,1\n")
    (tmp_path / "eval.csv").write_text("sentence,y\nnew,3\n")
    spec = DataSpec(train=tmp_path / "train.csv", text="sentence", label="y")
    data = load_task_data(spec)
    assert data.label_names == ("0", "1", "2") and data.eval is None
    assert [data.train[i]["label"] for i in range(3)] == [0, 2, 1]
    with pytest.raises(AdbError, match="label '3' is not in the train split"):
        load_task_data(spec.model_copy(update={"eval": tmp_path / "eval.csv"}))
    with pytest.raises(AdbError, match="no column 'text'; use one of sentence, y"):
        load_task_data(spec.model_copy(update={"text": "text"}))
    with pytest.raises(AdbError, match="does not exist"):
        load_task_data(spec.model_copy(update={"train": tmp_path / "nope.csv"}))


def test_question_answer_rows_with_image_paths(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("L", (4, 3), 77).save(tmp_path / "imgs" / "0.png")
    rows = [
        {"q": "2+2?", "a": "4", "img": "imgs/0.png"},
        {"q": "color?", "a": "grey", "img": "imgs/0.png"},
    ]
    _jsonl(tmp_path / "qa.jsonl", rows)
    spec = DataSpec(train=tmp_path / "qa.jsonl", question="q", answer="a", image="img")
    data = load_task_data(spec)
    assert data.label_names is None and data.train.labels is None
    item = data.train[1]
    assert (item["question"], item["answer"]) == ("color?", "grey")
    assert torch.equal(item["image"], torch.full((1, 3, 4), 77, dtype=torch.uint8))


def test_imagefolder_items_are_uint8_chw(tmp_path: Path) -> None:
    from PIL import Image

    for split, n in (("train", 2), ("eval", 1)):
        for cls, value in (("cat", 10), ("dog", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (6 + i, 5)
                Image.new("RGB", size, (value, value, value)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    spec = DataSpec(train=tmp_path / "train", eval=tmp_path / "eval")
    data = load_task_data(spec)
    assert data.label_names == ("cat", "dog")
    items = [data.train[i] for i in range(len(data.train))]
    assert sorted(item["label"] for item in items) == [0, 0, 1, 1]
    for item in items:
        assert item["image"].dtype == torch.uint8 and item["image"].shape[0] == 3
        assert int(item["image"].float().mean()) == (10 if item["label"] == 0 else 200)
    assert sorted(data.eval[i]["label"] for i in range(2)) == [0, 1]


def test_preprocess_gray_to_three_channels_and_normalise() -> None:
    gray = torch.full((2, 1, 28, 28), 51, dtype=torch.uint8)
    out = preprocess_images(gray, 64)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    for c in range(3):
        expected = (51 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c], torch.full((2, 64, 64), expected))
    as_float = preprocess_images([img.float() / 255 for img in gray], 64)
    torch.testing.assert_close(as_float, out)
    assert torch.equal(preprocess_images([img[0] for img in gray], 64), out)  # (H, W) input


def test_preprocess_resize_matches_interpolate_and_mixed_sizes() -> None:
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 10, 12), dtype=torch.uint8) for _ in range(2)]
    images.append(torch.randint(0, 256, (1, 7, 7), dtype=torch.uint8))
    out = preprocess_images(images, 16, mean=(0, 0, 0), std=(1, 1, 1))
    for image, got in zip(images, out, strict=True):
        rgb = image.float().div(255).expand(3, -1, -1)[None]
        want = F.interpolate(rgb, (16, 16), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(got, want[0])
    same = preprocess_images(images[:2], 16, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(same, out[:2])
