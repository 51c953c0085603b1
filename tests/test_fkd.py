"""The relabel ("FKD") evaluation recipe: each rule of shared/specs/relabel-eval.md §1/§5 on its own."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddfast import data, fkd
from ddfast.evaluate import evaluate_synset
from ddfast.train import get_teacher, load_teacher_pool, teacher_spec


@pytest.fixture(scope="module")
def dataset():
    return data.load("synthetic")


@pytest.fixture(scope="module")
def pool(dataset, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DDFAST_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    specs = [teacher_spec("convnet", 8, 1, 0, 0), teacher_spec("resnet18", 4, 1, 0, 200)]
    for s in specs:
        get_teacher(dataset, s["model"], s["width"], s["epochs"], s["seed"], train_images=s["train_images"])
    teachers, key = load_teacher_pool(dataset, specs)
    yield specs, teachers, key
    mp.undo()


def test_rrc_follows_torchvision_rule():
    gen = torch.Generator().manual_seed(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = fkd.rrc_params(gen, 28, 28)
        assert 0 <= top <= 28 - h and 0 <= left <= 28 - w and 0 < h <= 28 and 0 < w <= 28
        areas.append(h * w / 28 ** 2)
        ratios.append(w / h)
    # rounding of the side lengths widens the intervals a little at small sizes
    assert min(areas) >= 0.05 and max(areas) <= 1.0
    assert min(ratios) >= 0.6 and max(ratios) <= 1.7
    # The 10-try fallback: no try can succeed -> the whole image (ratio 1 is inside 3/4..4/3), centred
    assert fkd.rrc_params(gen, 28, 28, scale=(2.0, 3.0)) == (0, 0, 28, 28)
    # ...clipped to the ratio range for a wide image: height kept, width = round(h * 4/3), centred
    assert fkd.rrc_params(gen, 10, 40, scale=(2.0, 3.0)) == (0, (40 - 13) // 2, 10, 13)


def test_rand_bbox_is_the_official_arithmetic():
    for seed in range(20):
        lam = (seed + 0.5) / 20
        gen = torch.Generator().manual_seed(seed)
        state = gen.get_state()
        box = fkd.rand_bbox((5, 1, 28, 24), lam, gen)
        gen.set_state(state)
        cx, cy = int(torch.randint(0, 28, (1,), generator=gen)), int(torch.randint(0, 24, (1,), generator=gen))
        cut_w, cut_h = int(28 * math.sqrt(1 - lam)), int(24 * math.sqrt(1 - lam))
        want = (max(cx - cut_w // 2, 0), max(cy - cut_h // 2, 0), min(cx + cut_w // 2, 28), min(cy + cut_h // 2, 24))
        assert box == want


def test_epoch_batches_crop_flip_and_cutmix_in_place():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(7, 2, 12, 12)
    labels = torch.arange(7)
    draw = fkd.draw_epoch(gen, 7, 12, 12, batch_size=4)
    assert sorted(draw.order.tolist()) == list(range(7)) and len(draw.perms) == 2
    assert all(0.0 <= lam < 1.0 for lam in draw.lams)
    batches = fkd.augment_epoch(images, labels, draw, batch_size=4)
    start = 0
    for b, (x, y) in enumerate(batches):
        idx = draw.order[start : start + len(x)]
        assert torch.equal(y, labels[idx])  # CE target: the pre-CutMix label of the base image
        # rebuild the batch before CutMix, sample by sample
        pre = []
        for pos, i in enumerate(idx.tolist()):
            top, left, h, w = draw.crops[start + pos].tolist()
            crop = F.interpolate(images[i : i + 1, :, top : top + h, left : left + w], size=(12, 12), mode="bilinear", align_corners=False)
            pre.append(crop.flip(3) if draw.flips[start + pos] else crop)
        pre = torch.cat(pre)
        x1, y1, x2, y2 = draw.boxes[b]
        inside = torch.zeros(12, 12, dtype=torch.bool)
        inside[x1:x2, y1:y2] = True
        assert torch.allclose(x[..., ~inside], pre[..., ~inside])
        assert torch.allclose(x[..., inside], pre[draw.perms[b]][..., inside])
        start += len(x)


def test_soft_labels_are_the_pool_mean_on_the_mixed_images(pool):
    specs, teachers, key = pool
    images, labels = torch.randn(12, 1, 16, 16), torch.arange(12) % 10
    stream = fkd.LabelStream(images, labels, teachers, key, seed=3, epochs=2, batch_size=5)
    for e in range(2):
        for x, _, soft in stream.epoch(e):
            with torch.no_grad():
                want = sum(t(x) for t in teachers) / len(teachers)  # raw logits, no temperature
            assert torch.allclose(soft, want, atol=1e-5)
    assert all(not p.requires_grad for t in teachers for p in t.parameters()) and not any(t.training for t in teachers)


def test_cached_and_online_streams_are_identical(pool, tmp_path):
    _, teachers, key = pool
    images, labels = torch.randn(9, 1, 16, 16), torch.arange(9)
    online = fkd.LabelStream(images, labels, teachers, key, seed=5, epochs=3, batch_size=4, cache_dir=tmp_path)
    first = [online.epoch(e) for e in range(3)]
    online.save()
    cached = fkd.LabelStream(images, labels, teachers, key, seed=5, epochs=3, batch_size=4, cache_dir=tmp_path)
    assert cached.from_cache
    for e in range(3):
        for (xa, ya, sa), (xb, yb, sb) in zip(first[e], cached.epoch(e)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(sa, sb)
    assert cached.teacher_seconds == 0.0
    other_seed = fkd.LabelStream(images, labels, teachers, key, seed=6, epochs=3, batch_size=4, cache_dir=tmp_path)
    assert not other_seed.from_cache


def test_student_loss_optimizer_and_schedule(pool, monkeypatch):
    _, teachers, key = pool
    images, labels = torch.randn(10, 1, 16, 16), torch.arange(10)
    stream = fkd.LabelStream(images, labels, teachers, key, seed=0, epochs=4, batch_size=10)
    seen = {"lr": [], "loss": []}

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kw):
            seen["init"] = kw
            super().__init__(params, **kw)

        def step(self, closure=None):
            seen["lr"].append(self.param_groups[0]["lr"])
            return super().step(closure)

    real_mse = F.mse_loss
    monkeypatch.setattr(fkd.torch.optim, "AdamW", Spy)
    monkeypatch.setattr(fkd.F, "mse_loss", lambda a, b: seen["loss"].append((a.detach(), b)) or real_mse(a, b))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    fkd.train_student(net, stream, fkd.FKDConfig(epochs=4, batch_size=10))
    assert seen["init"] == {"lr": 1e-3, "weight_decay": 0.0}
    assert seen["lr"] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    assert torch.equal(seen["loss"][0][1], stream.epoch(0)[0][2])  # MSE against the pool's labels of that batch


def test_missing_teacher_and_unlabelled_files_fail_clearly(dataset, pool):
    with pytest.raises(FileNotFoundError, match="not in the teacher cache"):
        load_teacher_pool(dataset, [teacher_spec("convnet", 8, 7, 0, 0)])
    x, y = dataset.normalize(dataset.train_images[:20]), dataset.train_labels[:20]
    with pytest.raises(ValueError, match="names none"):
        evaluate_synset(x, y, dataset, label_mode="soft", recipe="fkd", teachers=None, epochs=1, runs=1)
    with pytest.raises(ValueError, match="random-subsets"):
        evaluate_synset(x, y, dataset, label_mode="hard", recipe="fkd", teachers=pool[0], random_subsets=True)


def test_evaluate_fkd_runs_share_one_stream_and_report_the_split(dataset, pool, tmp_path):
    specs, _, _ = pool
    x, y = dataset.normalize(dataset.train_images[:30]), dataset.train_labels[:30]
    kw = dict(label_mode="soft", recipe="fkd", teachers=specs, epochs=2, runs=2, width=8, label_cache=str(tmp_path))
    online = evaluate_synset(x, y, dataset, **kw)
    cached = evaluate_synset(x, y, dataset, **kw)
    assert online["accs"] == cached["accs"]  # same labels, same initialisations
    assert online["label_epochs_from_cache"] == 0 and cached["label_epochs_from_cache"] == 2
    assert online["time_split_seconds"]["teachers"] > 0 and cached["time_split_seconds"]["teachers"] == 0
    assert online["protocol"]["recipe"] == "fkd" and online["protocol"]["batch_size"] == 100
    base = evaluate_synset(x, y, dataset, random_subsets=True, **{**kw, "label_cache": None})
    assert base["protocol"]["random_subset_per_run"] and base["protocol"]["num_images"] == 30
