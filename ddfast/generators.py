"""Class-conditional generators: architectures, GAN pretraining (cached, resumable), the generator file
and sampling a distilled set of any IPC from it.

``dim`` is DiM's generator (with :class:`DiMCritic`, its WGAN-GP critic; trained by ``ddfast.methods.dim``).
``dcgan`` is the small DCGAN-style pair of the D2M CPU preset (specs/d2m-datadam-k2.md §5): the generator
maps z ∈ R^z_dim ⊕ one-hot(y) through FC → [2w, s/4, s/4] → BN, ReLU → ConvT 4×4/2 → [w, s/2, s/2] →
BN, ReLU → ConvT 4×4/2 → [C, s, s] → tanh; the discriminator is Conv 4×4/2 (w) → LeakyReLU(0.2) →
Conv 4×4/2 (2w) → BN → LeakyReLU(0.2) with a real/fake head and a class head (AC-GAN). Pretraining uses the
non-saturating GAN loss plus the AC-GAN class loss on both sides, Adam 2e-4, β = (0.5, 0.999).

A generator file (``save``/``load``) holds the architecture name, its keyword arguments, the state dict and
plain metadata, written by ``torch.save`` and read with ``torch.load(weights_only=True)``: loading never
runs code from the file. Images come out as tanh values, mapped (x+1)/2 into [0, 1] and then into the
dataset's normalisation, the pipeline every consumer (distillation, ``ddfast.generate``) shares.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast import data
from ddfast._version import __version__
from ddfast.io import check_plain, load_tagged
from ddfast.runner import Loop
from ddfast.utils import atomic_torch_save, cache_dir

FORMAT = "ddfast-generator"
FORMAT_VERSION = 1

Tensor = torch.Tensor


class ConditionalGenerator(nn.Module):
    """DCGAN-style class-conditional generator for s×s images, s divisible by 4 (28 and 32 px)."""

    def __init__(self, num_classes: int, channels: int = 1, image_size: int = 28, z_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.num_classes, self.z_dim, self.base = num_classes, z_dim, image_size // 4
        self.fc = nn.Linear(z_dim + num_classes, 2 * width * self.base * self.base)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, F.one_hot(y.long(), self.num_classes).to(z.dtype)], 1))
        return self.net(h.view(z.shape[0], -1, self.base, self.base))


class ConditionalDiscriminator(nn.Module):
    """AC-GAN discriminator: (real/fake logit [N], class logits [N, K])."""

    def __init__(self, num_classes: int, channels: int = 1, image_size: int = 28, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        dim = 2 * width * (image_size // 4) ** 2
        self.adv = nn.Linear(dim, 1)
        self.cls = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return self.adv(h).squeeze(1), self.cls(h)


def _check_dim_size(image_size: int) -> None:
    if image_size not in (28, 32):
        raise ValueError(f"DiM's generator and critic are defined for 28 and 32 px images, got {image_size}")


class DiMGenerator(nn.Module):
    """DiM's generator (vimar-gu/DiM gan_model.py:135-261, from GANs-on-CIFAR10): u ∈ R^z_dim → FC → BN1d,
    ReLU → [w, 4, 4] → ConvT (3×3/2 at 28 px, 4×4/2 at 32 px) → 3 × Conv 3×3 → ConvT 4×4/2 → Conv 3×3 →
    ConvT 4×4/2 → Conv 3×3 → C, tanh; every layer but the last followed by BN2d + ReLU; w = 196 officially.

    Conditioning ``overwrite`` (the code, gen_condense.py:228-231): the first ``num_classes`` entries of z
    are replaced by one-hot(y), so the FC input stays z_dim; ``concat`` (the paper's Eq. 4): [z ; one-hot(y)]."""

    def __init__(self, num_classes: int, channels: int = 1, image_size: int = 28, z_dim: int = 100, width: int = 196,
                 cond: str = "overwrite") -> None:
        super().__init__()
        _check_dim_size(image_size)
        if cond not in ("overwrite", "concat"):
            raise ValueError(f"cond must be 'overwrite' or 'concat', got {cond!r}")
        if cond == "overwrite" and z_dim < num_classes:
            raise ValueError(f"overwrite conditioning needs z_dim >= num_classes ({num_classes}), got {z_dim}")
        self.num_classes, self.z_dim, self.width, self.cond = num_classes, z_dim, width, cond
        self.fc = nn.Sequential(nn.Linear(z_dim + (num_classes if cond == "concat" else 0), width * 16),
                                nn.BatchNorm1d(width * 16), nn.ReLU())

        def block(conv: nn.Module) -> list[nn.Module]:
            return [conv, nn.BatchNorm2d(width), nn.ReLU()]

        first = nn.ConvTranspose2d(width, width, 3 if image_size == 28 else 4, 2, 1)  # 4 → 7 or 8
        up = lambda: nn.ConvTranspose2d(width, width, 4, 2, 1)  # noqa: E731
        conv = lambda: nn.Conv2d(width, width, 3, 1, 1)  # noqa: E731
        self.net = nn.Sequential(*block(first), *block(conv()), *block(conv()), *block(conv()), *block(up()),
                                 *block(conv()), *block(up()), nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh())

    def condition(self, z: Tensor, y: Tensor) -> Tensor:
        onehot = F.one_hot(y.long(), self.num_classes).to(z.dtype)
        if self.cond == "concat":
            return torch.cat([z, onehot], 1)
        return torch.cat([onehot, z[:, self.num_classes:]], 1)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(self.condition(z, y))
        return self.net(h.view(z.shape[0], self.width, 4, 4))


class DiMCritic(nn.Module):
    """DiM's critic (gan_model.py:8-132): 8 × [Conv 3×3 → LayerNorm([w, H, W]) (per-position affine) →
    LeakyReLU(0.01)], stride 2 at convs 2, 4 and 8 (28 → 14 → 7 → 4; 32 → 16 → 8 → 4), max-pool 4 → [w],
    heads: WGAN score [N] and class logits [N, K] (the official code hard-codes K = 10).

    ``fused`` (default) runs each LayerNorm + LeakyReLU as one ``ddfast.ops.ln_lrelu`` call, whose closed-form
    double backward serves the gradient penalty; the LeakyReLU slot then holds an Identity, so the state-dict
    keys are those of the unfused (official) layout either way."""

    def __init__(self, num_classes: int, channels: int = 1, image_size: int = 28, width: int = 196, fused: bool = True) -> None:
        super().__init__()
        from ddfast.ops.ln_lrelu import LayerNormLeakyReLU  # ddfast.ops imports the kernels lazily; keep this module light

        _check_dim_size(image_size)
        layers: list[nn.Module] = []
        size, c_in = image_size, channels
        for stride in (1, 2, 1, 2, 1, 1, 1, 2):
            size = (size - 1) // stride + 1
            norm_act = ([LayerNormLeakyReLU([width, size, size], 0.01), nn.Identity()] if fused
                        else [nn.LayerNorm([width, size, size]), nn.LeakyReLU(0.01)])
            layers += [nn.Conv2d(c_in, width, 3, stride, 1), *norm_act]
            c_in = width
        self.features = nn.Sequential(*layers, nn.MaxPool2d(4, 4), nn.Flatten())
        self.adv = nn.Linear(width, 1)
        self.cls = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return self.adv(h).squeeze(1), self.cls(h)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"dcgan": ConditionalGenerator, "dim": DiMGenerator}


# Architectures defined next to their method, registered when that module is imported.
_DEFINED_IN = {"dcgm": "ddfast.methods.dcgm"}


def create(arch: str, **kwargs: Any) -> nn.Module:
    if arch not in ARCHITECTURES and arch in _DEFINED_IN:
        importlib.import_module(_DEFINED_IN[arch])
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown generator architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](**kwargs)


def save(path: str | os.PathLike, generator: nn.Module, arch: str, kwargs: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a generator file atomically (state dict + architecture + plain metadata)."""
    meta = {**meta, "ddfast_version": __version__}
    check_plain(meta, "meta")
    check_plain(kwargs, "kwargs")
    atomic_torch_save({"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "kwargs": kwargs,
                       "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()}, "meta": meta}, path)


def load(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """(generator in eval mode, metadata) from a generator file."""
    blob = load_tagged(path, "ddfast generator", "a generator file written by ddfast (OUT/generator.pt of d2m, dim, dcgm)",
                       FORMAT, FORMAT_VERSION)
    generator = create(blob["arch"], **blob["kwargs"])
    generator.load_state_dict(blob["state_dict"])
    return generator.eval(), blob["meta"]


def to_dataset_space(x: Tensor, mean: Any, std: Any) -> Tensor:
    """tanh output in [−1, 1] → (x+1)/2 in [0, 1] → the dataset's normalisation (DiM validate.py's pipeline)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x + 1) / 2 - m) / s


def sample_latents(num_classes: int, ipc: int, z_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """(z [K·ipc, z_dim] ~ N(0, I), labels class-major) from ``seed``: the same draw for every generator."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_classes * ipc, z_dim, generator=gen)
    return z, torch.arange(num_classes).repeat_interleave(ipc)


@torch.no_grad()
def sample(generator: nn.Module, num_classes: int, ipc: int, seed: int, mean: Any, std: Any, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """A fixed distilled set: exactly ``ipc`` images per class, normalised, with hard labels (eval mode:
    batch norm uses its running statistics, so an image does not depend on the others drawn with it)."""
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    z, y = sample_latents(num_classes, ipc, generator.z_dim, seed)
    was_training = generator.training
    generator.eval()
    images = torch.cat([generator(z[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)])
    generator.train(was_training)
    return to_dataset_space(images, mean, std), y


# ----------------------------------------------------------------------------- GAN pretraining


@dataclasses.dataclass(frozen=True)
class GANConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    width: int = 64
    z_dim: int = 100
    train_images: int = 0  # 0 = all
    seed: int = 0

    def kwargs(self, dataset: data.Dataset) -> dict[str, Any]:
        return {"num_classes": dataset.num_classes, "channels": dataset.channels, "image_size": dataset.image_size[0],
                "z_dim": self.z_dim, "width": self.width}


def pretrained_path(dataset: data.Dataset, config: GANConfig) -> Path:
    name = f"dcgan-w{config.width}-z{config.z_dim}-e{config.epochs}-b{config.batch_size}-lr{config.lr:g}-s{config.seed}"
    if config.train_images:
        name += f"-n{config.train_images}"
    return cache_dir() / "generators" / dataset.name / f"{name}.pt"


def gan_state(g: nn.Module, d: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, **extra: Any) -> dict[str, Any]:
    """A GAN training checkpoint: both networks, both optimisers and ``extra`` plain fields."""
    return {"g": g.state_dict(), "d": d.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), **extra}


def final_state_path(path: Path) -> Path:
    """Where the final training state (both networks, both optimisers) of the generator cached at ``path`` is kept."""
    return path.with_suffix(".final.pt")


def shorter_schedule(path: Path, length: int, field: str = "it") -> Path | None:
    """The kept final state of the longest cached schedule shorter than ``length`` whose cache name differs from
    ``path``'s only in its ``-<field><N>-`` field, or None: a longer schedule runs on from it instead of from scratch
    (the GAN loops draw their randomness from (seed, iteration) or from an rng kept in the state, at a constant
    learning rate, so iteration ``it`` does not depend on the schedule's length)."""
    marker = f"-{field}{length}-"
    if path.name.count(marker) != 1:
        raise ValueError(f"{path.name} has no single {marker} field")
    head, tail = path.name.split(marker)
    pattern = re.compile(re.escape(f"{head}-{field}") + r"(\d+)-" + re.escape(tail[:-len(path.suffix)]) + re.escape(".final.pt"))
    found = [(int(m.group(1)), p) for p in path.parent.glob(f"{head}-{field}*.final.pt") if (m := pattern.fullmatch(p.name))]
    found = [(n, p) for n, p in found if n < length]
    return max(found)[1] if found else None


def cached_training_loop(path: Path, total: int, length: int, desc: str, every: int, field: str = "it",
                         unit: str = "it") -> tuple[Loop, dict[str, Any] | None]:
    """The loop of a generator trained into the cache at ``path`` (``total`` loop steps for a schedule whose length
    ``length`` is the ``-<field><N>-`` part of the name), with the state it starts from: an interrupted run's, else
    the kept final state of a shorter cached schedule, else None (from scratch)."""
    loop = Loop(path.with_suffix(".partial.pt"), {"cache": path.name}, total, desc, every=every, unit=unit)
    saved = loop.resume()
    if saved is None:
        saved = loop.continue_from(shorter_schedule(path, length, field))
    return loop, saved


def finish_cached_training(loop: Loop, path: Path, generator: nn.Module, arch: str, kwargs: dict[str, Any],
                           meta: dict[str, Any]) -> None:
    """Write the trained generator to the cache and keep the loop's final state beside it (for a longer schedule)."""
    save(path, generator, arch, kwargs, meta)
    loop.keep(final_state_path(path))


def restore_gan_state(blob: dict[str, Any], g: nn.Module, d: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> None:
    """Load what :func:`gan_state` wrote back into the networks and optimisers."""
    g.load_state_dict(blob["g"]), d.load_state_dict(blob["d"])
    opt_g.load_state_dict(blob["opt_g"]), opt_d.load_state_dict(blob["opt_d"])


def pretrain(dataset: data.Dataset, config: GANConfig) -> tuple[nn.Module, Path]:
    """Train (or load from the cache) the conditional GAN; checkpointed every epoch, so a killed run
    re-run with the same arguments resumes and ends with the same weights. Returns (generator, path)."""
    if dataset.image_size[0] != dataset.image_size[1] or dataset.image_size[0] % 4:
        raise ValueError(f"the dcgan generator needs square images with a side divisible by 4, got {dataset.image_size}")
    path = pretrained_path(dataset, config)
    if path.is_file():
        return load(path)[0], path
    from ddfast import judge  # here, not at the top: ddfast.judge samples through this module

    pair = judge.get_judge(dataset)  # first: training it reseeds the global RNG, which the lines below then set
    kwargs = config.kwargs(dataset)
    torch.manual_seed(config.seed)
    g = create("dcgan", **kwargs)
    d = ConditionalDiscriminator(dataset.num_classes, dataset.channels, dataset.image_size[0], config.width)
    opt_g = torch.optim.Adam(g.parameters(), lr=config.lr, betas=config.betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=config.lr, betas=config.betas)
    gen = torch.Generator().manual_seed(config.seed)
    images, labels = dataset.train_images, dataset.train_labels
    if config.train_images:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:config.train_images]
        images, labels = images[keep], labels[keep]
    real_all = images * 2 - 1  # the generator's tanh range
    n = len(labels)
    steps = n // config.batch_size  # drop the last partial batch (batch norm)
    # checkpoints at epoch ends: the next epoch's permutation comes from the saved rng
    loop, saved = cached_training_loop(path, config.epochs * steps, config.epochs, f"GAN pretraining ({dataset.name})", every=steps,
                                       field="e", unit="step")
    curve: list[dict[str, Any]] = []
    if saved is not None:
        restore_gan_state(saved, g, d, opt_g, opt_d)
        gen.set_state(saved["rng"])
        curve = list(saved["judge_curve"])
    g.train(), d.train()
    order = torch.empty(0, dtype=torch.long)

    def step(it: int) -> dict[str, str]:
        nonlocal order
        epoch, within = divmod(it, steps)
        if within == 0:
            curve.append(judge.curve_point(pair, g, dataset, it))
            order = torch.randperm(n, generator=gen)
        idx = order[within * config.batch_size:(within + 1) * config.batch_size]
        real, y = real_all[idx], labels[idx]
        z = torch.randn(len(idx), config.z_dim, generator=gen)
        y_fake = torch.randint(dataset.num_classes, (len(idx),), generator=gen)
        fake = g(z, y_fake)
        adv_r, cls_r = d(real)
        adv_f, cls_f = d(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(adv_r, torch.ones_like(adv_r))
                  + F.binary_cross_entropy_with_logits(adv_f, torch.zeros_like(adv_f))
                  + F.cross_entropy(cls_r, y) + F.cross_entropy(cls_f, y_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        adv_f, cls_f = d(fake)
        loss_g = F.binary_cross_entropy_with_logits(adv_f, torch.ones_like(adv_f)) + F.cross_entropy(cls_f, y_fake)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        return {"epoch": str(epoch + 1), "loss_d": f"{float(loss_d.detach()):.3f}", "loss_g": f"{float(loss_g.detach()):.3f}",
                "consistency": f"{curve[-1]['consistency']:.1f}%"}

    loop.run(step, lambda: gan_state(g, d, opt_g, opt_d, rng=gen.get_state(), judge_curve=curve))
    curve.append(judge.curve_point(pair, g, dataset, config.epochs * steps))
    finish_cached_training(loop, path, g, "dcgan", kwargs, {"dataset": dataset.name, "stage": "pretrained", "gan": dataclasses.asdict(config),
                                                            "judge_curve": curve,
                                                            "normalization": {"mean": list(dataset.mean), "std": list(dataset.std)}})
    return g.eval(), path
