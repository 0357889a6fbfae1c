"""Byte codecs for stored objects: byte planes for tensors, packed bits for masks.

Float bytes compress badly as they come because sign/exponent bytes (low entropy) interleave
with mantissa bytes (near-random). Splitting the bytes of each element into planes separates
the two. Masks are one bit per parameter (`numpy.packbits`); very sparse masks are stored as
the gaps between set positions, byte-plane split, which lands close to the entropy bound.

Tensors have two codecs; the object header says which one wrote an object, so stores written
by either stay readable:

- codec 1 (`encode_planes`): every byte plane one zstd level-1 frame. Still used for mask gaps.
- codec 2 (`encode_tensor`, issue 12): what ZipNN (arXiv 2411.05239) does, done with zstd and a
  small C kernel. For F32/BF16 the sign bit is rotated below the mantissa so the exponent fills
  one byte (`[S E8 M7]` -> `[E8][M7 S]`), otherwise its lowest bit lands in a mantissa byte and
  the sign doubles the exponent byte's alphabet. Each plane is then stored the cheapest way to
  decode that is about as small as its entropy allows: raw (near-random mantissa bytes: decoding
  is a copy), nibble-packed (low-entropy planes: the 15 most frequent bytes become 4-bit codes,
  two per byte, rarer bytes go to an escape list, and zstd entropy-codes the packed stream), or
  a plain zstd frame. zstd on an exponent plane as it is stays ~18% above its entropy because
  its greedy matcher takes short matches that cost more than the Huffman-coded literals they
  replace; in the nibble-packed stream repeats of 7 bytes (14 exponents) are rare and a pair
  alphabet lets Huffman come within ~2% of the entropy, below ZipNN's own Huffman coder.
  Frames carry no zstd checksum: the store re-hashes every decoded tensor with sha256.

The byte shuffling (plane split and join, sign rotation, nibble packing and unpacking with
the escapes) is one C pass each way, `storage/_planes.c`, built by `pip install -e .`; numpy
took several passes over the tensor for it and ran at ~half ZipNN's speed. The C code checks
every size against the header before it touches a byte and runs without the GIL. The numpy
version of codec 2, which the kernel must match byte for byte, is `tests/codec_reference.py`.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard as zstd

try:
    from adapterdb.storage import _planes
except ImportError as exc:  # a checkout whose C kernel was never built (or built for another
    raise ImportError(  # Python): no silent numpy fallback at half the speed
        "adapterdb's codec kernel (storage/_planes.c) is not built for this Python: run "
        "`pip install --no-deps -e .` (or `make`) in the repository"
    ) from exc

_LEVEL = 1  # level 1 compresses these planes as well as 3 (measured) at a fraction of the time
_MT_BYTES = 8 << 20  # planes at least this large compress with zstd's worker threads


def compress(data: memoryview | bytes | np.ndarray) -> bytes:
    """One zstd frame with a content checksum; multi-threaded for large inputs."""
    view = memoryview(data).cast("B")
    threads = -1 if view.nbytes >= _MT_BYTES else 0
    return zstd.ZstdCompressor(level=_LEVEL, write_checksum=True, threads=threads).compress(view)


_local = threading.local()  # zstd contexts are not thread-safe; making one costs ~15 us


def _dctx() -> zstd.ZstdDecompressor:
    try:
        return _local.dctx
    except AttributeError:
        _local.dctx = zstd.ZstdDecompressor()
        return _local.dctx


def decompress(frame: bytes | memoryview) -> bytes:
    return _dctx().decompress(frame)


def _split(data: np.ndarray, itemsize: int, rotated: bool) -> list[np.ndarray]:
    """Byte planes of a flat uint8 array, one C pass; with `rotated`, the sign bit rotated."""
    flat = np.ascontiguousarray(data).reshape(-1)
    if itemsize == 1:
        return [flat]
    n = flat.nbytes // itemsize
    out = np.empty(flat.nbytes, dtype=np.uint8)
    _planes.split(flat, n, itemsize, rotated, out)
    return [out[i * n : (i + 1) * n] for i in range(itemsize)]


def split_planes(data: np.ndarray, itemsize: int) -> list[np.ndarray]:
    """Byte plane i holds byte i of every element."""
    return _split(data, itemsize, False)


def join_planes(planes: list[np.ndarray], itemsize: int) -> np.ndarray:
    """Inverse of `split_planes`: interleave the planes back into element bytes."""
    if itemsize == 1:
        return planes[0]
    n = len(memoryview(planes[0]).cast("B")) if planes else 0
    out = np.empty(n * itemsize, dtype=np.uint8)
    _planes.join(out, n, itemsize, False, planes)  # ValueError if the planes' sizes differ
    return out


def encode_planes(data: np.ndarray, itemsize: int) -> list[bytes]:
    """Compressed frames, one per byte plane."""
    return [compress(p) for p in split_planes(data, itemsize)]


def decode_planes(frames: list[bytes | memoryview], itemsize: int) -> np.ndarray:
    planes = [np.frombuffer(decompress(f), dtype=np.uint8) for f in frames]
    return join_planes(planes, itemsize)


# --- tensors, codec 2 --------------------------------------------------------------------

CODEC = 2  # the tensor codec `encode_tensor` writes; objects without a codec field are codec 1
ROTATED = frozenset({"F32", "BF16"})  # dtypes whose top 16 bits are [sign, 8 exponent, 7 mantissa]
RAW, ZSTD, NIBBLE = "r", "z", "n"  # how one plane is stored (one letter per plane in the header)

_RAW_ENTROPY = 0.95 * 8  # bits/byte above which a plane is stored raw (ZipNN's threshold too)
_NIBBLE_ENTROPY = 3.5  # bits/byte below which 4-bit codes for the top 15 bytes pay off
_SAMPLE = 1 << 16  # bytes of a plane sampled to choose its encoding
_ESCAPE = 15  # the 4-bit code of "look this byte up in the escape list"
# For the nibble-packed stream: a full 128 KiB block per Huffman table, and the smallest hash
# table and longest minimum match zstd allows, so it codes literals and only takes long repeats.
_PACKED_PARAMS = zstd.ZstdCompressionParameters(
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstd.STRATEGY_FAST,
    write_checksum=False,
)


def _cctx(kind: str) -> zstd.ZstdCompressor:
    """This thread's compressor: "plain" (zstd level 1) or "packed" (`_PACKED_PARAMS`)."""
    try:
        cache = _local.cctx
    except AttributeError:
        cache = _local.cctx = {}
    if kind not in cache:
        if kind == "packed":
            cache[kind] = zstd.ZstdCompressor(compression_params=_PACKED_PARAMS)
        else:
            cache[kind] = zstd.ZstdCompressor(level=_LEVEL)
    return cache[kind]


def _compress_plain(plane: np.ndarray) -> bytes:
    """zstd level 1, no checksum (the sha256 of the decoded tensor covers it)."""
    if plane.nbytes >= _MT_BYTES:  # not cached: its worker threads would outlive the call
        return zstd.ZstdCompressor(level=_LEVEL, threads=-1).compress(plane)
    return _cctx("plain").compress(plane)


def _decompress_exact(frame: bytes | memoryview, size: int) -> bytes:
    """Decompress a frame that must hold exactly `size` bytes, checked before allocating."""
    if zstd.frame_content_size(frame) != size:
        raise ValueError("frame size does not match the tensor's shape")
    out = _dctx().decompress(frame)
    if len(out) != size:
        raise ValueError("frame size does not match the tensor's shape")
    return out


def _entropy_and_top(plane: np.ndarray) -> tuple[float, bytes]:
    """Order-0 entropy (bits/byte) of a sample of `plane` (every `step`-th byte, at most
    ~_SAMPLE of them), and its 16 most frequent bytes, most frequent first."""
    return _planes.rank(plane, max(1, plane.size // _SAMPLE))


def _nibble_encode(plane: np.ndarray, top: bytes) -> tuple[bytes, bytes]:
    """(zstd frame of the packed 4-bit codes, 16-byte table + escaped bytes).

    Codes 0..14 are the 15 most frequent bytes (`top[:15]`), high nibble first in each packed
    byte (an odd plane pads with a 0 nibble); code 15 escapes a byte, which goes to the escape
    list in plane order. The table is followed by one reserved byte, the 16th most frequent
    (the numpy decoder of codec 2 decoded escapes to it before patching them; now unused).
    """
    packed, side = _planes.nibble_pack(plane, top)
    return _cctx("packed").compress(packed), side


def _encode_plane(plane: np.ndarray) -> tuple[str, list[bytes | np.ndarray]]:
    """(encoding letter, frames) for one contiguous byte plane."""
    if plane.size < 64:
        return RAW, [plane]
    entropy, top = _entropy_and_top(plane)
    if entropy > _RAW_ENTROPY:
        return RAW, [plane]
    if entropy < _NIBBLE_ENTROPY:
        frames: list[bytes | np.ndarray] = list(_nibble_encode(plane, top))
        letter = NIBBLE
    else:
        frames, letter = [_compress_plain(plane)], ZSTD
    if sum(len(f) for f in frames) >= plane.size:
        return RAW, [plane]
    return letter, frames


def encode_tensor(
    data: np.ndarray, dtype: str, itemsize: int
) -> tuple[str, list[bytes | np.ndarray]]:
    """Codec 2: (one encoding letter per byte plane, frames) for a tensor's flat bytes.

    Frames may be numpy arrays (raw planes, written as they are without another copy).
    """
    planes = _split(data, itemsize, dtype in ROTATED and itemsize >= 2)
    letters, frames = [], []
    for plane in planes:
        letter, fs = _encode_plane(plane)
        letters.append(letter)
        frames.extend(fs)
    return "".join(letters), frames


def decode_tensor(
    letters: str, frames: list[bytes | memoryview], dtype: str, itemsize: int, n: int
) -> np.ndarray:
    """Inverse of `encode_tensor`: the tensor's flat bytes for `n` elements.

    Raises ValueError on frames that do not fit the header (a damaged object).
    """
    if len(letters) != itemsize or set(letters) - {RAW, ZSTD, NIBBLE}:
        raise ValueError(f"bad plane encodings {letters!r}")
    if len(frames) != sum(2 if c == NIBBLE else 1 for c in letters):
        raise ValueError("frame count does not match the plane encodings")
    # Each plane as `_planes.join` takes it: raw frames as they are, zstd frames decompressed,
    # nibble planes as (packed codes, table + escapes). Every size is checked against n before
    # the output is allocated (a damaged shape must not allocate terabytes); join checks again.
    planes: list[bytes | memoryview | tuple[bytes, bytes | memoryview]] = []
    pos = 0
    for letter in letters:
        frame = frames[pos]
        if letter == RAW:
            if len(frame) != n:
                raise ValueError("raw plane size does not match the tensor's shape")
            planes.append(frame)
        elif letter == ZSTD:
            planes.append(_decompress_exact(frame, n))
        else:
            planes.append((_decompress_exact(frame, (n + 1) // 2), frames[pos + 1]))
            pos += 1
        pos += 1
    out = np.empty(n * itemsize, dtype=np.uint8)
    _planes.join(out, n, itemsize, dtype in ROTATED and itemsize >= 2, planes)
    return out


# --- masks -------------------------------------------------------------------------------


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Canonical mask bytes: one bit per element, big-endian bit order, zero-padded."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1))


def unpack_mask(packed: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(packed, count=n).astype(bool)


def mask_gap_width(count: int, n: int, max_gap: int) -> int:
    """Bytes per gap if the gap encoding is the better one for this mask, else 0.

    Gaps win when fewer than one position in 16 is set (2-byte gaps then cost < 1 bit per
    parameter before compression); wider gaps are used only when a gap exceeds 16 bits.
    """
    if count == 0 or count * 16 >= n:
        return 0
    return 2 if max_gap < (1 << 16) else 4


def encode_mask(mask: np.ndarray) -> tuple[str, int, list[bytes]]:
    """(encoding, gap width, frames) for a flat bool mask: 'bits' or 'gaps'."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    # Count first: dense masks skip building 8-byte positions and gaps they would not use.
    if mask_gap_width(int(np.count_nonzero(flat)), flat.size, 0) == 0:
        return "bits", 0, [compress(pack_mask(flat))]
    idx = np.flatnonzero(flat)
    gaps = np.diff(idx, prepend=-1)
    width = mask_gap_width(idx.size, flat.size, int(gaps.max()))
    dtype = np.dtype(f"<u{width}")
    return "gaps", width, encode_planes(gaps.astype(dtype).view(np.uint8), width)


def decode_mask(encoding: str, width: int, frames: list[bytes | memoryview], n: int) -> np.ndarray:
    """The flat bool mask back from `encode_mask`'s output."""
    if (encoding, width) not in (("bits", 0), ("gaps", 2), ("gaps", 4)):
        raise ValueError(f"unknown mask encoding {encoding!r} with gap width {width}")
    if encoding == "bits":
        return unpack_mask(np.frombuffer(decompress(frames[0]), dtype=np.uint8), n)
    gaps = decode_planes(frames, width).view(np.dtype(f"<u{width}")).astype(np.int64)
    mask = np.zeros(n, dtype=bool)
    idx = np.cumsum(gaps) - 1
    if idx.size and (idx[-1] >= n or idx[0] < 0):
        raise ValueError("mask gaps point outside the mask")
    mask[idx] = True
    return mask
