"""Image-classification datasets behind one interface.

``load(name, data_dir)`` returns a :class:`Dataset` of float32 ``[N, C, H, W]`` images in ``[0, 1]``
and int64 labels, whatever the format on disk:

* ``fashion-mnist`` / ``mnist``: IDX files (plain or ``.gz``)
* ``cifar10`` / ``cifar100``: the "python version" pickled batches, read with a restricted
  unpickler that refuses anything but plain numpy arrays and containers
* ``imagefolder``: ``root/{train,test}/<class>/*.png|*.npy`` (other formats need Pillow)
* ``npz``: one ``.npz`` with ``x_train, y_train, x_test, y_test`` and optional ``class_names``
* ``synthetic``: a tiny deterministic in-memory dataset for tests

Every problem with the input raises :class:`DataError` naming the file and what is wrong.
No network access and no torchvision.
"""
from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "DEFAULT_DATA_DIRS",
    "DataError",
    "Dataset",
    "available",
    "load",
    "resolve_data_dir",
    "synthetic",
]


class DataError(ValueError):
    """A dataset file is missing, malformed or unsafe; the message names the file and problem."""


@dataclass(eq=False, repr=False)
class Dataset:
    name: str
    train_images: torch.Tensor  # float32 [N, C, H, W] in [0, 1]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # float32 [M, C, H, W] in [0, 1]
    test_labels: torch.Tensor  # int64 [M]
    class_names: list[str]
    mean: tuple[float, ...]  # per channel
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Datasets are also built by hand (e.g. distilled sets), so check the invariants the
        # rest of the library relies on once, here.
        for split in ("train", "test"):
            images: torch.Tensor = getattr(self, f"{split}_images")
            labels: torch.Tensor = getattr(self, f"{split}_labels")
            if images.dim() != 4 or images.dtype != torch.float32:
                raise DataError(f"{self.name}: {split}_images must be float32 [N, C, H, W], "
                                f"got {images.dtype} {list(images.shape)}")
            if labels.dim() != 1 or labels.dtype != torch.int64 or len(labels) != len(images):
                raise DataError(f"{self.name}: {split}_labels must be int64 [{len(images)}], "
                                f"got {labels.dtype} {list(labels.shape)}")
            setattr(self, f"{split}_images", images.contiguous())
            setattr(self, f"{split}_labels", labels.contiguous())
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(f"{self.name}: train images are {list(self.train_images.shape[1:])} "
                            f"but test images are {list(self.test_images.shape[1:])}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"{self.name}: mean/std have {len(self.mean)}/{len(self.std)} entries "
                            f"for {self.channels} channels")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    def _stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() < 3 or images.shape[-3] != self.channels:
            raise ValueError(f"{self.name}: expected images [..., {self.channels}, H, W], "
                             f"got {list(images.shape)}")
        kw = {"dtype": images.dtype if images.is_floating_point() else torch.float32,
              "device": images.device}
        return (torch.tensor(self.mean, **kw).view(-1, 1, 1),
                torch.tensor(self.std, **kw).view(-1, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images)
        return (images - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images)
        return images * std + mean

    def __repr__(self) -> str:
        c, (h, w) = self.channels, self.image_size
        return (f"Dataset(name={self.name!r}, train={len(self.train_labels)}, "
                f"test={len(self.test_labels)}, shape={c}x{h}x{w}, classes={self.num_classes})")


DEFAULT_DATA_DIRS: dict[str, str] = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
    "cifar10": "/usr/share/datasets/cifar10",
    "cifar100": "/usr/share/datasets/cifar100",
}

_INSTALL_HINTS = {"fashion-mnist": "apt-get install -y dataset-fashion-mnist"}

_ALIASES = {"fmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}

_ENV_VAR = "DDFAST_DATA_DIR"

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

_STATS = {
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def resolve_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``name`` lives: ``data_dir`` if given, else ``$DDFAST_DATA_DIR``, else the default.

    ``$DDFAST_DATA_DIR`` may point at the dataset itself or at a root holding one folder per
    dataset (``$DDFAST_DATA_DIR/<name>``), so one variable can serve every dataset.
    """
    name = _canonical(name)
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(_ENV_VAR)
    if env:
        root = Path(env).expanduser()
        return root / name if (root / name).exists() else root
    if name in DEFAULT_DATA_DIRS:
        return Path(DEFAULT_DATA_DIRS[name])
    raise DataError(f"{name}: no data_dir given and ${_ENV_VAR} is not set; "
                    f"pass data_dir= (the dataset's root folder or file)")


# ---------------------------------------------------------------------------------------------
# shared helpers

def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the name or the magic bytes say gzip."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data ({e or type(e).__name__})") from e
    return raw


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 array -> float32 tensor in [0, 1] (two vectorised passes, no per-image loop)."""
    out = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return out.div_(255.0)


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(f"{source}: label {int(bad[0])} outside [0, {num_classes}) "
                        f"({bad.size} bad labels)")


def _labels_tensor(labels: np.ndarray, num_classes: int, source: str) -> torch.Tensor:
    _check_labels(labels, num_classes, source)
    return torch.from_numpy(labels.astype(np.int64))


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), correction=0)
    # A constant channel would make normalize() divide by zero.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def _missing(directory: Path, expected: list[str], name: str, extra: str = "") -> DataError:
    hint = f"; install it with `{_INSTALL_HINTS[name]}`" if name in _INSTALL_HINTS else ""
    return DataError(f"{name}: missing files in {directory}: expected {', '.join(expected)}"
                     f"{extra}{hint}")


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, base: str) -> Path | None:
    # Mirrors name the files either "train-images-idx3-ubyte" or "train-images.idx3-ubyte".
    for stem in (base, base.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            if (directory / (stem + suffix)).is_file():
                return directory / (stem + suffix)
    return None


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header: expected {header} bytes, found {len(data)}")
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        raise DataError(f"{path}: wrong IDX magic number: expected {magic}, found {found} "
                        f"(not an {'image' if ndim == 3 else 'label'} file?)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    payload = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != payload:
        raise DataError(f"{path}: truncated or oversized IDX file: expected {payload} bytes of "
                        f"payload for shape {list(dims)}, found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx(name: str, directory: Path) -> Dataset:
    paths = {key: _find_idx(directory, base) for key, base in _IDX_FILES.items()}
    if any(p is None for p in paths.values()):
        absent = [base + "[.gz]" for key, base in _IDX_FILES.items() if paths[key] is None]
        raise _missing(directory, absent, name)
    class_names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    splits = {}
    for split in ("train", "test"):
        img_path, lbl_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = _read_idx(img_path, 2051, 3)
        labels = _read_idx(lbl_path, 2049, 1)
        if len(images) != len(labels):
            raise DataError(f"{name}: {img_path} has {len(images)} images but {lbl_path} has "
                            f"{len(labels)} labels")
        splits[split] = (_to_float(images[:, None]), _labels_tensor(labels, 10, str(lbl_path)))
    mean, std = _STATS[name]
    return Dataset(name, *splits["train"], *splits["test"], list(class_names), mean, std)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (pickled python batches)

def _safe_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 moved numpy.core to numpy._core; pickles may name either
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store bytes
    }
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    for mod in ("builtins", "__builtin__"):  # plain containers written by Python 2 or 3
        for typ in (set, frozenset, bytearray):
            allowed[(mod, typ.__name__)] = typ
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads only plain numpy arrays and builtin containers; any other global is refused,
    because unpickling an arbitrary global is how a malicious file runs code."""

    _allowed = _safe_globals()

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"refusing to load {module}.{name} from {self._path}: the file tries "
                            f"to run code (only numpy arrays and plain containers are allowed)"
                            ) from None


def _unpickle(path: Path) -> dict[str, Any]:
    data = _read_bytes(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # any unpickling failure is a malformed file, never a crash
        raise DataError(f"{path}: not a valid pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    # The original files are Python-2 pickles: keys come back as str with encoding="latin1"
    # but as bytes from files re-pickled by Python 3.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise DataError(f"{path}: missing key {key!r} (has {sorted(map(str, batch))})")
    return batch[key]


def _read_cifar_batch(path: Path, label_key: str,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = _cifar_field(batch, "data", path)
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072], "
                        f"found {type(data).__name__}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072] (3x32x32 images), "
                        f"found {data.dtype} {list(data.shape)}")
    try:
        labels = np.asarray(_cifar_field(batch, label_key, path), dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {label_key!r} is not a list of integers ({e})") from e
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels in {label_key!r}")
    _check_labels(labels, num_classes, str(path))
    return data, labels


def _load_cifar(name: str, root: Path) -> Dataset:
    if name == "cifar10":
        folder, tarball = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        train_files, test_file = [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
        meta_file, label_key, names_key, num_classes = "batches.meta", "labels", "label_names", 10
    else:
        folder, tarball = "cifar-100-python", "cifar-100-python.tar.gz"
        train_files, test_file = ["train"], "test"
        meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
        num_classes = 100
    directory = root / folder if (root / folder).is_dir() else root
    absent = [f for f in [*train_files, test_file] if not (directory / f).is_file()]
    if absent:
        extra = (f" (found {tarball}: extract it with `tar xzf {tarball}`)"
                 if (directory / tarball).is_file()
                 else f" (pass the extracted {folder}/ folder or its parent)")
        raise _missing(directory, absent, name, extra)

    parts = [_read_cifar_batch(directory / f, label_key, num_classes) for f in train_files]
    test_x, test_y = _read_cifar_batch(directory / test_file, label_key, num_classes)
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])

    class_names = CIFAR10_CLASSES if name == "cifar10" else [str(i) for i in range(100)]
    if (directory / meta_file).is_file():
        meta_path = directory / meta_file
        raw = _cifar_field(_unpickle(meta_path), names_key, meta_path)
        class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in raw]
        if len(class_names) != num_classes:
            raise DataError(f"{meta_path}: {names_key!r} has {len(class_names)} names, "
                            f"expected {num_classes}")
    mean, std = _STATS[name]
    return Dataset(name,
                   _to_float(train_x.reshape(-1, 3, 32, 32)), torch.from_numpy(train_y),
                   _to_float(test_x.reshape(-1, 3, 32, 32)), torch.from_numpy(test_y),
                   class_names, mean, std)


# ---------------------------------------------------------------------------------------------
# array conventions shared by npz and per-image .npy files

def _array_images(arr: np.ndarray, source: str, batched: bool) -> np.ndarray:
    """Images [..., C, H, W], uint8 (0..255) or float (0..1), from arrays laid out [H, W],
    [H, W, C] or [C, H, W] (with a leading N when ``batched``); other integer types must
    hold 0..255."""
    lead = 1 if batched else 0
    if arr.ndim == lead + 2:
        arr = np.expand_dims(arr, lead)
    elif arr.ndim == lead + 3:
        c_first, c_last = arr.shape[lead], arr.shape[-1]
        # The channel axis is the short one; when both are short, torch's [C, H, W] wins.
        if c_last <= 4 < c_first:
            arr = np.moveaxis(arr, -1, lead)
        elif c_first > 4:
            raise DataError(f"{source}: cannot tell the channel axis of shape {list(arr.shape)} "
                            f"(expected at most 4 channels first or last)")
    else:
        want = ("[N, H, W], [N, H, W, C] or [N, C, H, W]" if batched
                else "[H, W], [H, W, C] or [C, H, W]")
        raise DataError(f"{source}: images must be {want}, found shape {list(arr.shape)}")

    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: integer images must be in [0, 255], found [{lo}, {hi}]")
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(arr.min()), float(arr.max())
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise DataError(f"{source}: float images must be in [0, 1], found [{lo}, {hi}]")
        return arr
    raise DataError(f"{source}: unsupported image dtype {arr.dtype}")


def _images_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.uint8:
        return _to_float(arr)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# npz

def _load_npz(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"npz: {path} is not a file (pass data_dir=path/to/data.npz)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: expected an .npz archive, found a single .npy array")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except DataError:
        raise
    except Exception as e:  # zipfile/zlib/numpy raise many types for a damaged archive
        # object arrays (e.g. class_names saved as a list of str with dtype=object) need pickle
        raise DataError(f"{path}: cannot read as .npz without pickle ({e})") from e
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)} "
                        f"(has {', '.join(sorted(arrays))})")

    labels = {}
    for key in ("y_train", "y_test"):
        y = arrays[key]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: {key} must be a 1-D integer array, "
                            f"found {y.dtype} {list(y.shape)}")
        labels[key] = y
    if "class_names" in arrays:
        class_names = [str(n) for n in arrays["class_names"].reshape(-1)]
    else:
        top = max((int(y.max()) for y in labels.values() if y.size), default=-1)
        class_names = [str(i) for i in range(top + 1)]

    splits = []
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
        x = _array_images(arrays[x_key], f"{path}: {x_key}", batched=True)
        if len(x) != len(labels[y_key]):
            raise DataError(f"{path}: {x_key} has {len(x)} images but {y_key} has "
                            f"{len(labels[y_key])} labels")
        y = _labels_tensor(labels[y_key], len(class_names), f"{path}: {y_key}")
        splits += [_images_tensor(x), y]
    return Dataset("npz", *splits, class_names, *_channel_stats(splits[0]))


# ---------------------------------------------------------------------------------------------
# imagefolder (PNG decoder + .npy + optional Pillow)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, path: Path) -> np.ndarray:
    rows = np.zeros((height, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        start = y * (stride + 1)
        ftype = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1)
        if ftype == 0:
            row = line
        elif ftype == 1:  # Sub: running sum along pixels, mod 256 via uint8 wrap-around
            row = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif ftype == 2:  # Up
            row = line + prior
        elif ftype in (3, 4):  # Average / Paeth depend on the decoded left byte: scalar loop
            out, up = bytearray(line.tobytes()), prior.tobytes()
            for i in range(stride):
                left = out[i - bpp] if i >= bpp else 0
                if ftype == 3:
                    out[i] = (out[i] + ((left + up[i]) >> 1)) & 0xFF
                else:
                    ul = up[i - bpp] if i >= bpp else 0
                    out[i] = (out[i] + _paeth(left, up[i], ul)) & 0xFF
            row = np.frombuffer(bytes(out), dtype=np.uint8)
        else:
            raise DataError(f"{path}: corrupt PNG: unknown filter type {ftype} on row {y}")
        rows[y] = row
        prior = rows[y]
    return rows


def _read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced grey/RGB/palette PNG (alpha dropped) to uint8 [C, H, W]."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if not data.startswith(_PNG_SIGNATURE):
        raise DataError(f"{path}: not a PNG file (bad signature)")
    pos, ihdr, palette, idat = len(_PNG_SIGNATURE), None, None, []
    while True:
        if pos + 8 > len(data):
            raise DataError(f"{path}: truncated PNG (no IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise DataError(f"{path}: truncated PNG in chunk {ctype!r}")
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(ctype + body) != crc:
            raise DataError(f"{path}: corrupt PNG: CRC mismatch in chunk {ctype!r}")
        pos += 12 + length
        if ctype == b"IHDR" and length == 13:
            ihdr = struct.unpack(">IIBBBBB", body)
        elif ctype == b"PLTE" and length % 3 == 0:
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    if ihdr is None or ihdr[0] == 0 or ihdr[1] == 0:
        raise DataError(f"{path}: corrupt PNG: missing or invalid IHDR chunk")
    width, height, depth, color, _, _, interlace = ihdr
    if depth != 8 or color not in _PNG_CHANNELS or interlace:
        raise DataError(f"{path}: unsupported PNG (bit depth {depth}, colour type {color}, "
                        f"interlace {interlace}); only 8-bit non-interlaced grey/RGB/RGBA/palette "
                        f"PNGs are decoded without Pillow")
    bpp = _PNG_CHANNELS[color]
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise DataError(f"{path}: corrupt PNG image data ({e})") from e
    if len(raw) != height * (width * bpp + 1):
        raise DataError(f"{path}: corrupt PNG: expected {height * (width * bpp + 1)} bytes of "
                        f"image data, found {len(raw)}")
    pixels = _unfilter(raw, height, width * bpp, bpp, path).reshape(height, width, bpp)
    if color == 3:
        if palette is None or int(pixels.max(initial=0)) >= len(palette):
            raise DataError(f"{path}: corrupt PNG: palette missing or too short")
        pixels = palette[pixels[..., 0]]
    elif color in (4, 6):
        pixels = pixels[..., :-1]  # drop alpha
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _read_pil(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{path}: reading {path.suffix} images needs Pillow (`pip install pillow`);"
                        f" or convert them to PNG or .npy") from None
    try:
        with Image.open(path) as im:
            im = im.convert("L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
            arr = np.asarray(im)
    except Exception as e:  # Pillow raises several types for malformed files
        raise DataError(f"{path}: cannot decode image ({e})") from e
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # a damaged header fails inside numpy with SyntaxError and others
        raise DataError(f"{path}: cannot read .npy ({e})") from e
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected one array in .npy format, found {type(arr).__name__}")
    return _array_images(arr, str(path), batched=False)


_READERS: dict[str, Callable[[Path], np.ndarray]] = {
    ".png": _read_png, ".npy": _read_npy,
    **{ext: _read_pil for ext in (".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")},
}


def _scan_split(directory: Path) -> dict[str, list[Path]]:
    if not directory.is_dir():
        return {}
    return {d.name: sorted(p for p in d.iterdir()
                           if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in _READERS)
            for d in sorted(directory.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _load_imagefolder(root: Path) -> Dataset:
    train, test = _scan_split(root / "train"), _scan_split(root / "test")
    if not train or not test:
        raise DataError(f"imagefolder: {root} must contain train/<class>/ and test/<class>/ "
                        f"folders of images (.png, .npy, or other formats with Pillow)")
    class_names = sorted(train)
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise DataError(f"imagefolder: {root / 'test'} has classes not in train/: "
                        f"{', '.join(unknown)}")
    for split, classes in (("train", train), ("test", test)):
        if not any(classes.values()):
            raise DataError(f"imagefolder: no images found under {root / split}")

    loaded: dict[str, tuple[list[np.ndarray], list[int], list[Path]]] = {}
    for split, classes in (("train", train), ("test", test)):
        images, labels, paths = [], [], []
        for label, cls in enumerate(class_names):
            for p in classes.get(cls, []):
                images.append(_READERS[p.suffix.lower()](p))
                labels.append(label)
                paths.append(p)
        loaded[split] = (images, labels, paths)

    all_images = loaded["train"][0] + loaded["test"][0]
    channels = 3 if any(im.shape[0] == 3 for im in all_images) else 1
    ref_path = loaded["train"][2][0]
    ref_hw = all_images[0].shape[1:]
    tensors = []
    for split in ("train", "test"):
        images, labels, paths = loaded[split]
        for i, (im, p) in enumerate(zip(images, paths)):
            if im.shape[0] not in (1, 3):
                raise DataError(f"{p}: expected 1 or 3 channels, found {im.shape[0]}")
            if im.shape[1:] != ref_hw:
                raise DataError(f"{p}: image is {im.shape[2]}x{im.shape[1]} (WxH) but {ref_path} "
                                f"is {ref_hw[1]}x{ref_hw[0]}; all images must have one size "
                                f"(no resizing is done)")
            if im.shape[0] != channels:  # grey images among colour ones become grey RGB
                images[i] = np.repeat(im, channels, axis=0)
        # mixed uint8/float sources: bring everything to float in [0, 1]
        stacked = [_images_tensor(im[None]) for im in images]
        tensors += [torch.cat(stacked), torch.tensor(labels, dtype=torch.int64)]
    return Dataset("imagefolder", *tensors, class_names, *_channel_stats(tensors[0]))


# ---------------------------------------------------------------------------------------------
# synthetic

def synthetic(train_per_class: int = 40, test_per_class: int = 20, image_size: int = 16,
              channels: int = 1, noise: float = 0.15, seed: int = 0) -> Dataset:
    """Ten classes, each a distinct simple pattern (bars, diagonals, squares, ...) at a random
    brightness plus Gaussian noise: deterministic for a given seed and easy for a small model."""
    s = image_size
    if s < 8:
        raise DataError(f"synthetic: image_size must be at least 8, got {s}")
    i, j = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    c, h, q = s // 2, max(1, s // 8), s // 4
    hbar, vbar = (i - c).abs() < h, (j - c).abs() < h
    diag, anti = (i - j).abs() < h, (i + j - (s - 1)).abs() < h
    inner = (i >= q) & (i < s - q) & (j >= q) & (j < s - q)
    ring = inner & ~((i >= q + h) & (i < s - q - h) & (j >= q + h) & (j < s - q - h))
    checker = ((i // q + j // q) % 2) == 0
    patterns = torch.stack([hbar, vbar, diag, anti, ring, inner, hbar | vbar, diag | anti,
                            checker, j < c]).float()  # [10, s, s]
    names = ["hbar", "vbar", "diagonal", "antidiagonal", "ring", "square", "plus", "cross",
             "checker", "left-half"]

    gen = torch.Generator().manual_seed(seed)

    def make(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(10).repeat_interleave(per_class)
        brightness = 0.6 + 0.4 * torch.rand(len(labels), 1, 1, 1, generator=gen)
        base = patterns[labels][:, None].expand(-1, channels, -1, -1)
        x = base * brightness + noise * torch.randn(len(labels), channels, s, s, generator=gen)
        return x.clamp_(0.0, 1.0).contiguous(), labels

    train_x, train_y = make(train_per_class)
    test_x, test_y = make(test_per_class)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, names, *_channel_stats(train_x))


# ---------------------------------------------------------------------------------------------
# entry points

_LOADERS: dict[str, Callable[[str, Path], Dataset]] = {
    "fashion-mnist": _load_idx,
    "mnist": _load_idx,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "imagefolder": lambda _name, root: _load_imagefolder(root),
    "npz": lambda _name, path: _load_npz(path),
}


def available() -> list[str]:
    """Dataset names accepted by :func:`load`."""
    return sorted([*_LOADERS, "synthetic"])


HOLDOUT_SUFFIX = "-holdout"


def holdout(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """A validation view: ``n`` training images (a fixed seeded draw) become the test split and leave
    the training split. Named ``<name>-holdout<n>`` so teachers, statistics and distilled files made on
    it never mix with the full dataset's; for choosing hyper-parameters without the test set."""
    if not 0 < n < len(dataset.train_labels):
        raise DataError(f"--holdout must be in 1..{len(dataset.train_labels) - 1}, got {n}")
    order = torch.randperm(len(dataset.train_labels), generator=torch.Generator().manual_seed(seed))
    keep, held = order[n:].sort().values, order[:n].sort().values
    return Dataset(f"{dataset.name}{HOLDOUT_SUFFIX}{n}", dataset.train_images[keep], dataset.train_labels[keep],
                   dataset.train_images[held], dataset.train_labels[held], list(dataset.class_names), dataset.mean, dataset.std)


def load(name: str, data_dir: str | os.PathLike | None = None, holdout_images: int = 0) -> Dataset:
    """Load dataset ``name`` from ``data_dir`` (else ``$DDFAST_DATA_DIR``, else the default dir);
    ``holdout_images > 0`` (or a name ending in ``-holdout<n>``) returns :func:`holdout` of it."""
    base, sep, count = name.rpartition(HOLDOUT_SUFFIX)
    if sep and count.isdigit():
        if holdout_images and holdout_images != int(count):
            raise DataError(f"dataset {name!r} already holds out {count} images; --holdout {holdout_images} disagrees")
        return holdout(load(base, data_dir), int(count))
    if holdout_images:
        return holdout(load(name, data_dir), holdout_images)
    key = _canonical(name)
    if key == "synthetic":
        return synthetic()
    if key not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return _LOADERS[key](key, resolve_data_dir(key, data_dir))
