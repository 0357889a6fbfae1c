"""Content-addressed objects: bit-exact round trips, compression-independent ids, corruption."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import lora_tensors, run_adb, to_raw
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import CorruptObjectError, NotFoundError
from adapterdb.storage import codec
from adapterdb.storage.commits import Commit
from adapterdb.storage.objects import ObjectStore
from adapterdb.storage.store import Store
from adapterdb.tensorfile import DTYPES, RawTensor

SETTINGS = settings(max_examples=40, deadline=None)


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int) -> RawTensor:
    numel = int(np.prod(shape, dtype=np.int64))
    data = np.random.default_rng(seed).integers(0, 256, numel * DTYPES[dtype][0], dtype=np.uint8)
    return RawTensor(dtype, shape, data)


@SETTINGS
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple),
    seed=st.integers(0, 2**32 - 1),
)
def test_tensor_put_get_is_bit_identical(
    tmp_path_factory: pytest.TempPathFactory, dtype: str, shape: tuple[int, ...], seed: int
) -> None:
    objects = ObjectStore(tmp_path_factory.mktemp("objects"))
    t = random_tensor(dtype, shape, seed)
    back = objects.get_tensor(objects.put_tensor(t))
    assert (back.dtype, back.shape) == (t.dtype, t.shape)
    assert back.data.dtype == np.uint8
    assert back.data.tobytes() == t.data.tobytes()


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_lora_factors_round_trip(tmp_path: Path, dtype: str) -> None:
    objects = ObjectStore(tmp_path)
    for t in lora_tensors(seed=5, dtype=dtype).values():
        back = objects.get_tensor(objects.put_tensor(t))
        assert back.shape == t.shape and back.data.tobytes() == t.data.tobytes()


def test_zero_element_tensors_keep_their_shape(tmp_path: Path) -> None:
    objects = ObjectStore(tmp_path)
    ids = set()
    for shape in [(0,), (0, 4), (4, 0), (2, 0, 3, 3)]:
        t = RawTensor("BF16", shape, np.empty(0, np.uint8))
        oid = objects.put_tensor(t)
        ids.add(oid)
        assert objects.get_tensor(oid).shape == shape
    assert len(ids) == 4  # the shape is part of the content


def test_same_content_same_id_stored_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = to_raw(np.random.default_rng(0).standard_normal((64, 64)), "F32")
    fast, slow = ObjectStore(tmp_path / "a"), ObjectStore(tmp_path / "b")
    oid = fast.put_tensor(t)
    monkeypatch.setattr(codec, "_NIBBLE_ENTROPY", 0.0)  # exponent plane: plain zstd, not packed
    assert slow.put_tensor(t) == oid
    assert fast.path(oid).read_bytes() != slow.path(oid).read_bytes()  # really another encoding
    assert slow.get_tensor(oid).data.tobytes() == fast.get_tensor(oid).data.tobytes()
    assert fast.put_tensor(t) == oid
    assert list(fast.ids()) == [oid] and fast.temp_files() == []


def test_dtype_and_shape_are_part_of_the_id(tmp_path: Path) -> None:
    objects = ObjectStore(tmp_path)
    data = np.arange(16, dtype=np.uint8)
    ids = {
        objects.put_tensor(RawTensor("F32", (4,), data)),
        objects.put_tensor(RawTensor("F32", (2, 2), data)),
        objects.put_tensor(RawTensor("I32", (4,), data)),
        objects.put_tensor(RawTensor("BF16", (8,), data)),
    }
    assert len(ids) == 4


def test_masks_and_json_round_trip(tmp_path: Path) -> None:
    objects = ObjectStore(tmp_path)
    rng = np.random.default_rng(0)
    for n, p in [(0, 0.5), (7, 0.5), (1001, 0.002), (1001, 0.6), (100_003, 0.0), (100_003, 1.0)]:
        mask = rng.random(n) < p
        assert np.array_equal(objects.get_mask(objects.put_mask(mask)), mask)
    # equal packed bytes, different lengths: different masks
    assert objects.put_mask(np.zeros(7, bool)) != objects.put_mask(np.zeros(8, bool))
    doc = {"b": [1, 2.5, None], "a": {"x": "ünïcode"}}
    oid = objects.put_json(doc)
    assert objects.get_json(oid) == doc
    assert objects.put_json(json.loads(json.dumps(doc, sort_keys=True))) == oid


def test_concurrent_writers_of_one_object(tmp_path: Path) -> None:
    """Equal tensors stored by parallel threads (zero LoRA B factors) share one object."""
    t = RawTensor("F32", (1024, 512), np.zeros(1024 * 512 * 4, np.uint8))
    for round_ in range(4):
        objects = ObjectStore(tmp_path / str(round_))
        with ThreadPoolExecutor(4) as pool:
            ids = set(pool.map(objects.put_tensor, [t] * 8))
        assert len(ids) == 1
        objects.verify(ids.pop())
        assert objects.temp_files() == []


def test_missing_object_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        ObjectStore(tmp_path).get_json("ab" * 32)


def test_wrong_kind_is_refused(tmp_path: Path) -> None:
    objects = ObjectStore(tmp_path)
    oid = objects.put_json({"type": "manifest"})
    with pytest.raises(CorruptObjectError):
        objects.get_tensor(oid)
    with pytest.raises(CorruptObjectError):
        objects.get_mask(oid)


# -- corruption ------------------------------------------------------------------------------


def sample_objects(objects: ObjectStore) -> dict[str, tuple[str, object]]:
    """One object of every kind and encoding, with its getter."""
    rng = np.random.default_rng(7)
    return {
        "tensor-f32": (
            objects.put_tensor(lora_tensors(1)["base_model.model.conv.lora_A.weight"]),
            objects.get_tensor,
        ),
        "tensor-bf16": (
            objects.put_tensor(lora_tensors(2, "BF16")["base_model.model.lin.lora_B.weight"]),
            objects.get_tensor,
        ),
        "mask-bits": (objects.put_mask(rng.random(300) < 0.5), objects.get_mask),
        "mask-gaps": (objects.put_mask(rng.random(3000) < 0.01), objects.get_mask),
        "json": (objects.put_json({"type": "commit", "message": "x" * 40}), objects.get_json),
    }


def header_end(blob: bytes) -> int:
    return 9 + int.from_bytes(blob[5:9], "little")


@pytest.mark.parametrize("kind", ["tensor-f32", "tensor-bf16", "mask-bits", "mask-gaps", "json"])
def test_any_flipped_byte_is_refused(tmp_path: Path, kind: str) -> None:
    """Every position of the file: magic, kind, header length, JSON header, frames, checksums."""
    objects = ObjectStore(tmp_path)
    oid, get = sample_objects(objects)[kind]
    path = objects.path(oid)
    original = path.read_bytes()
    for pos in range(len(original)):
        damaged = bytearray(original)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(CorruptObjectError, match=oid[:12]):
            get(oid)  # type: ignore[operator]
    path.write_bytes(original[:-1])
    with pytest.raises(CorruptObjectError):
        get(oid)  # type: ignore[operator]
    path.write_bytes(b"")
    with pytest.raises(CorruptObjectError):
        get(oid)  # type: ignore[operator]


@pytest.mark.parametrize("kind", ["mask-bits", "mask-gaps"])
def test_any_single_bit_flip_in_the_header_is_refused(tmp_path: Path, kind: str) -> None:
    """Mask header fields the content hash does not cover (encoding, gap width) are checked."""
    objects = ObjectStore(tmp_path)
    oid, get = sample_objects(objects)[kind]
    path = objects.path(oid)
    original = path.read_bytes()
    for pos in range(header_end(original)):
        for bit in range(8):
            damaged = bytearray(original)
            damaged[pos] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(CorruptObjectError):
                get(oid)  # type: ignore[operator]


def test_fsck_reports_a_damaged_object(repo: Path) -> None:
    store = Store.open(repo)
    manifest = store.put_adapter(lora_tensors(3), {"r": 2})
    store.commit(Commit(manifest=manifest, kind="import", provenance={"test": True}), "main")
    victim = store.read_manifest(manifest).tensors["base_model.model.lin.lora_B.weight"].id
    path = store.objects.path(victim)
    original = path.read_bytes()
    for pos in (
        0,
        4,
        6,
        header_end(original) - 3,
        header_end(original) + 1,
        len(original) // 2,
        len(original) - 1,
    ):
        damaged = bytearray(original)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        report = store.fsck()
        assert not report.ok
        assert any(victim[:12] in e for e in report.errors)
    rc, out, err = run_adb(["fsck", "--json"], cwd=repo)
    assert rc == 1, err
    doc = json.loads(out)
    assert doc["ok"] is False and any(victim[:12] in e for e in doc["errors"])
    path.write_bytes(original)
    assert store.fsck().ok
