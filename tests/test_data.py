"""Tests for ddfast.data: every fixture is written into tmp_path, nothing is downloaded."""
from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ddfast.data import DEFAULT_DATA_DIRS, DataError, Dataset, available, load, resolve_data_dir

FASHION_DIR = Path(DEFAULT_DATA_DIRS["fashion-mnist"])
IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# --------------------------------------------------------------------------------------------
# fixture writers

def write_idx(path: Path, arr: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    magic = magic if magic is not None else (2051 if arr.ndim == 3 else 2049)
    blob = struct.pack(f">i{arr.ndim}i", magic, *arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def make_idx_dir(root: Path, n_train: int = 12, n_test: int = 7, gz: bool = True,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """A small MNIST-format folder with 6x5 images (non-square, to catch H/W mix-ups)."""
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, 6, 5), dtype=np.uint8),
        IDX_NAMES[1]: np.arange(n_train, dtype=np.uint8) % 10,
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, 6, 5), dtype=np.uint8),
        IDX_NAMES[3]: (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / name, arr, gz=gz)
    return arrays


def dump(path: Path, obj: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar10(parent: Path, per_batch: int = 4, n_test: int = 3) -> tuple[np.ndarray, ...]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        # protocol 2 with bytes keys, like the originals re-pickled by Python 3
        dump(folder / f"data_batch_{i}",
             {b"batch_label": b"training batch", b"data": x, b"labels": y})
        xs.append(x)
        ys += y
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = np.array([9, 0, 5][:n_test])
    dump(folder / "test_batch", {b"data": tx, b"labels": ty}, protocol=4)  # labels as ndarray
    names = [b"plane", b"car", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(xs), np.array(ys), tx, ty


def png_bytes(pixels: np.ndarray, color: int, palette: np.ndarray | None = None) -> bytes:
    """Minimal PNG encoder; row y uses filter y % 5 so the decoder's five filters all get used."""
    h, w = pixels.shape[:2]
    flat = pixels.reshape(h, -1).astype(int)
    bpp = flat.shape[1] // w
    raw = bytearray()
    for y in range(h):
        ftype = y % 5
        raw.append(ftype)
        for i in range(flat.shape[1]):
            x = flat[y, i]
            a = flat[y, i - bpp] if i >= bpp else 0
            b = flat[y - 1, i] if y else 0
            c = flat[y - 1, i - bpp] if y and i >= bpp else 0
            p = a + b - c
            paeth = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
            pred = [0, a, b, (a + b) // 2, paeth][ftype]
            raw.append((x - pred) % 256)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    return out + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loads_exact_values(tmp_path: Path, name: str, gz: bool) -> None:
    arrays = make_idx_dir(tmp_path, gz=gz)
    ds = load(name, tmp_path)
    assert ds.name == name
    assert ds.train_images.shape == (12, 1, 6, 5) and ds.test_images.shape == (7, 1, 6, 5)
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.is_contiguous()
    expected = torch.from_numpy(arrays[IDX_NAMES[0]].astype(np.float32) / 255)[:, None]
    assert torch.equal(ds.train_images, expected)
    assert ds.test_labels.tolist() == arrays[IDX_NAMES[3]].tolist()
    assert (ds.channels, ds.image_size, ds.num_classes) == (1, (6, 5), 10)
    if name == "mnist":
        assert ds.class_names == [str(i) for i in range(10)]
        assert (ds.mean, ds.std) == ((0.1307,), (0.3081,))
    else:
        assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
        assert (ds.mean, ds.std) == ((0.2861,), (0.3530,))


def test_idx_dotted_file_names(tmp_path: Path) -> None:
    # some mirrors ship "train-images.idx3-ubyte"
    make_idx_dir(tmp_path, gz=False)
    for name in IDX_NAMES:
        (tmp_path / name).rename(tmp_path / name.replace("-idx", ".idx"))
    assert len(load("mnist", tmp_path).train_labels) == 12


def test_idx_missing_files_names_dir_files_and_install_hint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing files in .*train-images-idx3-ubyte.*"
                                        r"t10k-labels-idx1-ubyte.*"
                                        r"apt-get install -y dataset-fashion-mnist"):
        load("fashion-mnist", tmp_path)


def test_idx_one_missing_file_is_named(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"expected t10k-labels-idx1-ubyte\[\.gz\]; install"):
        load("fashion-mnist", tmp_path)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    arrays = make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / IDX_NAMES[0], arrays[IDX_NAMES[0]], magic=2049 + 100)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: wrong IDX magic number: "
                                        r"expected 2051, found 2149"):
        load("mnist", tmp_path)


def test_idx_labels_file_given_as_images(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    (tmp_path / IDX_NAMES[1]).write_bytes((tmp_path / IDX_NAMES[0]).read_bytes())
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: wrong IDX magic number: "
                                        r"expected 2049, found 2051"):
        load("mnist", tmp_path)


def test_idx_truncated_images(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / IDX_NAMES[2]
    path.write_bytes(path.read_bytes()[:-11])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated .*expected 210 bytes "
                                        r"of payload .*found 199"):
        load("mnist", tmp_path)


def test_idx_truncated_labels(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=True)
    path = tmp_path / (IDX_NAMES[1] + ".gz")
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-2]))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: truncated .*expected 12 "
                                        r"bytes of payload .*found 10"):
        load("mnist", tmp_path)


def test_idx_truncated_header(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    (tmp_path / IDX_NAMES[0]).write_bytes(struct.pack(">ii", 2051, 12))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated IDX header"):
        load("mnist", tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_idx_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    make_idx_dir(tmp_path, gz=True)
    path = tmp_path / (IDX_NAMES[0] + ".gz")
    blob = path.read_bytes()
    path.write_bytes(b"this is not gzip" if damage == "garbage" else blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: corrupt gzip"):
        load("mnist", tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / IDX_NAMES[1], np.zeros(11, np.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has 12 images but "
                                        r".*train-labels-idx1-ubyte has 11 labels"):
        load("mnist", tmp_path)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / IDX_NAMES[3], np.array([0, 1, 2, 10, 4, 5, 6], np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label 10 outside \[0, 10\)"):
        load("mnist", tmp_path)


@pytest.mark.skipif(not FASHION_DIR.is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    ds = load("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    assert 0.0 <= float(ds.train_images.min()) and float(ds.train_images.max()) <= 1.0
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    assert abs(float(ds.train_images.mean()) - ds.mean[0]) < 1e-3


# --------------------------------------------------------------------------------------------
# CIFAR

@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_loads(tmp_path: Path, point_at_folder: bool) -> None:
    train_x, train_y, test_x, test_y = make_cifar10(tmp_path)
    ds = load("cifar10", tmp_path / "cifar-10-batches-py" if point_at_folder else tmp_path)
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    expected = torch.from_numpy(train_x.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(ds.train_images, expected)
    assert ds.train_labels.tolist() == train_y.tolist()
    assert ds.test_labels.tolist() == test_y.tolist() and ds.test_labels.dtype == torch.int64
    assert ds.class_names[:2] == ["plane", "car"]
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2023, 0.1994, 0.2010)


def test_cifar100_loads_with_str_keys(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    # str keys are what encoding="latin1" gives for the original Python-2 pickles
    dump(folder / "train", {"data": x, "fine_labels": [99, 0], "coarse_labels": [1, 2]}, protocol=5)
    dump(folder / "test", {"data": x[:1], "fine_labels": [42]})
    dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    ds = load("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.class_names[42] == "c42"
    assert ds.train_labels.tolist() == [99, 0] and ds.test_labels.tolist() == [42]
    assert float(ds.train_images[0, 0, 0, 5]) == pytest.approx(5 / 255)
    assert ds.mean == (0.5071, 0.4866, 0.4409)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    dump(tmp_path / "cifar-10-batches-py" / "data_batch_3",
         {b"data": _Exploit(marker), b"labels": [0]})
    with pytest.raises(DataError, match=r"refusing to load (posix|os|nt)\.system from "
                                        r".*data_batch_3: the file tries to run code"):
        load("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_wrong_data_shape(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    dump(tmp_path / "cifar-10-batches-py" / "test_batch",
         {b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(DataError, match=r"test_batch: 'data' must be uint8 \[N, 3072\].*"
                                        r"found uint8 \[3, 1024\]"):
        load("cifar10", tmp_path)


def test_cifar_label_count_and_range(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    dump(batch, {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(DataError, match=r"data_batch_1: 4 images but 3 labels"):
        load("cifar10", tmp_path)
    dump(batch, {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]})
    with pytest.raises(DataError, match=r"data_batch_1: label 10 outside \[0, 10\)"):
        load("cifar10", tmp_path)


def test_cifar_missing_and_not_a_pickle(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match=r"cifar10: missing files in .*cifar-10-batches-py: "
                                        r"expected data_batch_5"):
        load("cifar10", tmp_path)
    (folder / "data_batch_5").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=r"data_batch_5: not a valid pickle"):
        load("cifar10", tmp_path)


# --------------------------------------------------------------------------------------------
# npz

@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw_float"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (6, 3, 7, 5), dtype=np.uint8)  # N, C, H, W
    y_train, y_test = np.array([0, 1, 2, 0, 1, 2]), np.array([2, 1])
    if layout == "nhw":
        x, want = base[:, 0], base[:, :1].astype(np.float32) / 255
    elif layout == "nhwc":
        x, want = base.transpose(0, 2, 3, 1), base.astype(np.float32) / 255
    else:
        x = want = base.astype(np.float32) / 255
    path = write_npz(tmp_path / "d.npz", x_train=x, y_train=y_train, x_test=x[:2], y_test=y_test,
                     class_names=np.array(["a", "b", "c"]))
    ds = load("npz", path)
    assert torch.equal(ds.train_images, torch.from_numpy(want))
    assert ds.image_size == (7, 5) and ds.class_names == ["a", "b", "c"]
    assert ds.train_labels.tolist() == y_train.tolist()
    w64 = torch.from_numpy(want).double()
    assert ds.mean == pytest.approx(w64.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert ds.std == pytest.approx(w64.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-12)


def test_npz_class_names_default_to_indices(tmp_path: Path) -> None:
    x = np.zeros((3, 4, 4), np.uint8)
    ds = load("npz", write_npz(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 3, 1]),
                               x_test=x[:1], y_test=np.array([2])))
    assert ds.class_names == ["0", "1", "2", "3"]
    assert ds.std == (1.0,)  # constant images: std falls back to 1 instead of 0


def test_npz_missing_key(tmp_path: Path) -> None:
    x = np.zeros((2, 4, 4), np.uint8)
    path = write_npz(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1]), x_test=x)
    with pytest.raises(DataError, match=r"d\.npz: missing key\(s\) y_test"):
        load("npz", path)


def test_npz_bad_values_and_labels(tmp_path: Path) -> None:
    x = np.full((2, 4, 4), 2.0, np.float32)
    path = write_npz(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1]), x_test=x,
                     y_test=np.array([0, 1]))
    with pytest.raises(DataError, match=r"d\.npz: x_train: float images must be in \[0, 1\]"):
        load("npz", path)
    path = write_npz(tmp_path / "e.npz", x_train=x / 2, y_train=np.array([0, 5]), x_test=x / 2,
                     y_test=np.array([0, 1]), class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"e\.npz: y_train: label 5 outside \[0, 2\)"):
        load("npz", path)


def test_npz_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"PK\x03\x04 but not really")
    with pytest.raises(DataError, match=r"d\.npz: cannot read as \.npz"):
        load("npz", path)


# --------------------------------------------------------------------------------------------
# imagefolder

def test_imagefolder_png_and_npy(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    imgs = {  # colour type -> HWC pixels; 9 rows so every PNG filter type appears
        2: rng.integers(0, 256, (9, 7, 3), dtype=np.uint8),
        6: rng.integers(0, 256, (9, 7, 4), dtype=np.uint8),
        0: rng.integers(0, 256, (9, 7, 1), dtype=np.uint8),
    }
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    indices = rng.integers(0, 4, (9, 7, 1), dtype=np.uint8)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.png").write_bytes(png_bytes(imgs[2], 2))
    (tmp_path / "train" / "cat" / "b.png").write_bytes(png_bytes(imgs[6], 6))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "train" / "dog" / "c.png").write_bytes(png_bytes(imgs[0], 0))
    (tmp_path / "train" / "dog" / "d.png").write_bytes(png_bytes(indices, 3, palette))
    npy = rng.random((3, 9, 7)).astype(np.float32)
    np.save(tmp_path / "test" / "dog" / "e.npy", npy)

    ds = load("imagefolder", tmp_path)
    assert ds.class_names == ["cat", "dog"] and ds.train_labels.tolist() == [0, 0, 1, 1]
    assert ds.train_images.shape == (4, 3, 9, 7) and ds.test_labels.tolist() == [1]

    def chw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 255)

    assert torch.equal(ds.train_images[0], chw(imgs[2]))
    assert torch.equal(ds.train_images[1], chw(imgs[6][..., :3]))  # alpha dropped
    assert torch.equal(ds.train_images[2], chw(imgs[0]).expand(3, -1, -1))  # grey -> RGB
    assert torch.equal(ds.train_images[3], chw(palette[indices[..., 0]]))
    assert torch.equal(ds.test_images[0], torch.from_numpy(npy))
    assert len(ds.mean) == 3
    assert ds.mean[0] == pytest.approx(float(ds.train_images[:, 0].double().mean()))


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"must contain train/<class>/ and test/<class>/"):
        load("imagefolder", tmp_path)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
    good = png_bytes(np.zeros((4, 4, 1), np.uint8), 0)
    (tmp_path / "train" / "a" / "x.png").write_bytes(good)
    (tmp_path / "test" / "a" / "y.png").write_bytes(good[:-20])
    with pytest.raises(DataError, match=r"y\.png: truncated PNG"):
        load("imagefolder", tmp_path)
    (tmp_path / "test" / "a" / "y.png").write_bytes(png_bytes(np.zeros((5, 4, 1), np.uint8), 0))
    with pytest.raises(DataError, match=r"y\.png: image is 4x5 .*x\.png is 4x4"):
        load("imagefolder", tmp_path)


def test_imagefolder_jpeg_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` fail even where installed
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "x.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError, match=r"x\.jpg: reading \.jpg images needs Pillow"):
        load("imagefolder", tmp_path)


def test_imagefolder_other_formats_with_pillow(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(4).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        image.fromarray(rgb).save(tmp_path / split / "a" / "x.bmp")  # lossless, so exact
    (tmp_path / "test" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode image"):
        load("imagefolder", tmp_path)
    (tmp_path / "test" / "a" / "bad.jpg").unlink()
    ds = load("imagefolder", tmp_path)
    want = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.equal(ds.train_images[0], want)


# --------------------------------------------------------------------------------------------
# damaged files of every format fail with DataError only

def _mutations(blob: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        b = bytearray(blob)
        if rng.random() < 0.3:
            del b[rng.randrange(len(b)):]  # truncate
        else:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        out.append(bytes(b))
    return out


def _fuzz_target(kind: str, root: Path) -> tuple[str, Path, Path]:
    """(dataset name, data_dir, the file to damage) for one small valid dataset."""
    if kind == "idx":
        make_idx_dir(root)
        return "mnist", root, root / (IDX_NAMES[0] + ".gz")
    if kind == "cifar":
        make_cifar10(root)
        return "cifar10", root, root / "cifar-10-batches-py" / "test_batch"
    if kind == "npz":
        x = np.zeros((2, 4, 4), np.uint8)
        path = write_npz(root / "d.npz", x_train=x, y_train=np.array([0, 1]), x_test=x,
                         y_test=np.array([1, 0]), class_names=np.array(["a", "b"]))
        return "npz", path, path
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
    pixels = np.random.default_rng(5).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    (root / "train" / "a" / "x.png").write_bytes(png_bytes(pixels, 2))
    np.save(root / "test" / "a" / "y.npy", pixels)
    return "imagefolder", root, root / ("train/a/x.png" if kind == "png" else "test/a/y.npy")


@pytest.mark.parametrize("kind", ["idx", "cifar", "npz", "png", "npy"])
def test_damaged_files_raise_only_data_error(tmp_path: Path, kind: str) -> None:
    name, data_dir, victim = _fuzz_target(kind, tmp_path)
    load(name, data_dir)  # the undamaged dataset loads
    for blob in _mutations(victim.read_bytes(), random.Random(kind), 60):
        victim.write_bytes(blob)
        try:
            load(name, data_dir)
        except DataError:
            pass  # anything else (struct.error, zlib.error, SyntaxError...) fails the test


# --------------------------------------------------------------------------------------------
# names, directories, synthetic, Dataset

def test_unknown_name_lists_available() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'; available: cifar10, "
                                        r"cifar100, fashion-mnist, imagefolder, mnist, npz, "
                                        r"synthetic"):
        load("imagenet")
    assert "fashion-mnist" in available() and "synthetic" in available()


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDFAST_DATA_DIR", raising=False)
    assert resolve_data_dir("mnist", None) == Path(DEFAULT_DATA_DIRS["mnist"])
    assert resolve_data_dir("Fashion_MNIST", None) == Path(DEFAULT_DATA_DIRS["fashion-mnist"])
    with pytest.raises(DataError, match=r"npz: no data_dir given and \$DDFAST_DATA_DIR is not set"):
        resolve_data_dir("npz", None)
    monkeypatch.setenv("DDFAST_DATA_DIR", str(tmp_path))
    assert resolve_data_dir("mnist", None) == tmp_path
    (tmp_path / "mnist").mkdir()
    assert resolve_data_dir("mnist", None) == tmp_path / "mnist"  # root with one folder per dataset
    assert resolve_data_dir("mnist", "/elsewhere") == Path("/elsewhere")  # argument wins


def test_env_override_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_dir(tmp_path / "fashion-mnist", n_train=5)
    monkeypatch.setenv("DDFAST_DATA_DIR", str(tmp_path))
    assert len(load("fashion-mnist").train_labels) == 5
    monkeypatch.setenv("DDFAST_DATA_DIR", str(tmp_path / "fashion-mnist"))
    assert len(load("fashion-mnist").train_labels) == 5


def test_synthetic_deterministic_balanced_learnable() -> None:
    a, b = load("synthetic"), load("synthetic")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_images, b.test_images)
    assert a.train_images.shape == (400, 1, 16, 16) and a.test_images.shape == (200, 1, 16, 16)
    assert torch.bincount(a.train_labels).tolist() == [40] * 10
    assert torch.bincount(a.test_labels).tolist() == [20] * 10
    assert 0.0 <= float(a.train_images.min()) and float(a.train_images.max()) <= 1.0
    # nearest class centroid already separates the classes, so a small model can learn them
    centroids = torch.stack([a.train_images[a.train_labels == k].mean(0) for k in range(10)])
    dist = torch.cdist(a.test_images.flatten(1), centroids.flatten(1))
    assert (dist.argmin(1) == a.test_labels).float().mean() > 0.95


def test_normalize_round_trip() -> None:
    ds = load("synthetic")
    x = ds.train_images[:8]
    z = ds.normalize(x)
    assert z.shape == x.shape
    assert torch.allclose(ds.denormalize(z), x, atol=1e-6)
    assert abs(float(ds.normalize(ds.train_images).mean())) < 1e-4
    with pytest.raises(ValueError, match="expected images"):
        ds.normalize(torch.zeros(2, 3, 16, 16))


def test_dataset_validates_hand_built_tensors() -> None:
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(DataError, match="train_labels must be int64"):
        Dataset("d", x, torch.zeros(2), x, torch.zeros(2, dtype=torch.long), ["a"], (0.0,), (1.0,))
    with pytest.raises(DataError, match="mean/std have 3/3 entries for 1 channels"):
        Dataset("d", x, torch.zeros(2, dtype=torch.long), x, torch.zeros(2, dtype=torch.long),
                ["a"], (0.0,) * 3, (1.0,) * 3)
