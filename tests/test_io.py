"""The distilled-set file and its PNG grid."""
import os
import struct
import zlib

import pytest
import torch

from ddfast import io


def _sample():
    images = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    soft = torch.randn(6, 3)
    meta = {"method": "random", "config": {"ipc": 2, "lr": 0.05, "flags": [True, None]}, "seed": 3}
    return images, labels, soft, meta


def test_round_trip(tmp_path):
    images, labels, soft, meta = _sample()
    path = tmp_path / "distilled.pt"
    io.save(path, images, labels, soft, meta)
    blob = io.load(path)
    assert torch.equal(blob["images"], images)
    assert torch.equal(blob["labels"], labels) and blob["labels"].dtype == torch.int64
    assert torch.equal(blob["soft_labels"], soft)
    assert blob["meta"]["config"] == meta["config"]
    assert blob["meta"]["ddfast_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["distilled.pt"]  # no temp file left behind


def test_soft_labels_optional(tmp_path):
    images, labels, _, _ = _sample()
    io.save(tmp_path / "d.pt", images, labels)
    assert io.load(tmp_path / "d.pt")["soft_labels"] is None


def test_loading_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": io.FORMAT, "format_version": 1, "images": Evil()}, path)
    with pytest.raises(ValueError, match="not a valid ddfast distilled set") as refused:
        io.load(path)
    assert not marker.exists()
    # plain words, and never torch's advice to retry with weights_only=False
    assert "nothing in it was executed" in str(refused.value) and "will likely succeed" not in str(refused.value)
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a valid ddfast distilled set.*Expected a file written by ddfast.io.save") as refused:
        io.load(tmp_path / "random.pt")
    assert "will likely succeed" not in str(refused.value)


def test_bad_inputs_are_rejected(tmp_path):
    images, labels, soft, _ = _sample()
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        io.save(tmp_path / "x.pt", images, labels[:3])
    with pytest.raises(ValueError, match="soft_labels must be"):
        io.save(tmp_path / "x.pt", images, labels, soft[:2])
    with pytest.raises(TypeError, match="meta.obj"):
        io.save(tmp_path / "x.pt", images, labels, meta={"obj": object()})
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing format tag"):
        io.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        io.load(tmp_path / "absent.pt")


def test_grid_png_has_one_row_per_class(tmp_path):
    images, labels, _, _ = _sample()
    path = tmp_path / "grid.png"
    io.save_grid(path, images, labels, mean=(0.5,), std=(0.25,), num_classes=3)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, color) == (2 + 2 * (8 + 2), 2 + 3 * (8 + 2), 8, 0)
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == height * (width + 1)


def test_compare_reports_the_image_difference(tmp_path, capsys):
    images, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    io.save(tmp_path / "a.pt", images, labels)
    io.save(tmp_path / "b.pt", images * 1.01, labels)
    io.save(tmp_path / "c.pt", images, labels.flip(0))
    result = io.compare(tmp_path / "a.pt", tmp_path / "b.pt")
    assert result["relative_l2"] == pytest.approx(0.01, rel=1e-4)
    assert io.main(["compare", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]) == 0
    assert "relative L2 difference 1.000e-02" in capsys.readouterr().out
    assert io.main(["compare", str(tmp_path / "a.pt"), str(tmp_path / "c.pt")]) == 2
    assert "different label sets" in capsys.readouterr().err
