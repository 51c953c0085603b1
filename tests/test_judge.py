"""The judge (ddfast.judge): class consistency and within-class diversity, on known inputs and against a
float64 loop; its CLI on a distilled set and a generator file."""
import itertools
import json

import pytest
import torch
import torch.nn as nn

from ddfast import data, generators, io, judge

pytestmark = pytest.mark.usefixtures("module_cache_dir")  # tests/conftest.py


@pytest.fixture(scope="module")
def synthetic():
    ds = data.load("synthetic")
    return ds, judge.get_judge(ds)


def test_real_test_images_score_the_judges_test_accuracy(synthetic):
    ds, (model, acc) = synthetic
    metrics = judge.judge_set(ds, ds.normalize(ds.test_images), ds.test_labels, judge=(model, acc))
    assert metrics["consistency"] == pytest.approx(acc, abs=1e-9)
    per_class = metrics["consistency_per_class"]
    counts = torch.bincount(ds.test_labels, minlength=ds.num_classes).double()
    assert sum(p * c for p, c in zip(per_class, counts.tolist())) / counts.sum() == pytest.approx(acc, abs=1e-9)
    assert 0 < metrics["real_diversity"] <= 2


def test_a_constant_generator_scores_chance_and_no_diversity(synthetic):
    ds, pair = synthetic
    labels = torch.arange(ds.num_classes).repeat_interleave(5)
    images = ds.normalize(ds.train_images[:1]).expand(len(labels), -1, -1, -1)  # one image for every class and code
    metrics = judge.judge_set(ds, images, labels, judge=pair)
    assert metrics["consistency"] == pytest.approx(100.0 / ds.num_classes)
    assert metrics["diversity"] == pytest.approx(0.0, abs=1e-6)


def test_diversity_is_the_mean_pairwise_distance_of_unit_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(11, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 1, 0, 0])  # class 2 has one image: left out
    with torch.no_grad():
        features = nn.functional.relu(net[1](x.flatten(1)))
    spreads = []
    for k in (0, 1):
        rows = [f / f.norm() for f, label in zip(features, y) if label == k]
        pairs = [float((a - b).norm()) for a, b in itertools.permutations(rows, 2)]
        spreads.append(sum(pairs) / len(pairs))
    assert judge.within_class_diversity(net, x, y, 3) == pytest.approx(sum(spreads) / 2, rel=1e-12)
    assert judge.within_class_diversity(net, x[:3], torch.tensor([0, 1, 2]), 3) is None


def test_cli_on_a_distilled_set_and_on_a_generator(synthetic, tmp_path, capsys):
    ds, _ = synthetic
    idx = torch.arange(0, 40)
    norm = {"mean": list(ds.mean), "std": list(ds.std)}
    io.save(tmp_path / "set.pt", ds.normalize(ds.train_images[idx]), ds.train_labels[idx], None,
            {"method": "random", "dataset": "synthetic", "normalization": norm})
    assert judge.main([str(tmp_path / "set.pt"), "--json", str(tmp_path / "m.json")]) == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    assert "class consistency" in capsys.readouterr().out and saved["judge"]["model"] == judge.JUDGE_MODEL
    g = generators.create("dcgan", num_classes=ds.num_classes, channels=ds.channels, image_size=ds.image_size[0], z_dim=8, width=8)
    kwargs = {"num_classes": ds.num_classes, "channels": ds.channels, "image_size": ds.image_size[0], "z_dim": 8, "width": 8}
    generators.save(tmp_path / "g.pt", g, "dcgan", kwargs, {"dataset": "synthetic", "normalization": norm})
    assert judge.main([str(tmp_path / "g.pt"), "--ipc", "3"]) == 0
    assert judge.main([str(tmp_path / "g.pt"), "--ipc", "0"]) == 2
    (tmp_path / "junk.pt").write_text("not a tensor file")
    assert judge.main([str(tmp_path / "junk.pt")]) == 2
    assert "error:" in capsys.readouterr().err
