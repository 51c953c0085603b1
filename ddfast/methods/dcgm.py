"""DCGM — condensing a dataset into a generative model (Zhang, Shou et al. 2023, arXiv 2309.07698; docs/methods/dcgm.md).

There is no official code: every choice the paper leaves open is ours (the paper is silent on it) and is
marked **[ours]** here; ``_describe`` prints all of them at the start of a run.

The distilled format is a codebook Z ∈ R^{IPC×C_z} shared by all classes plus a class-conditional
generator; the distilled set is exactly {x̃_{k,y} = G([z_k ; P e_y]) : k ≤ IPC, y ≤ K} (one run per IPC).

* Class embedding e_y ([ours]): mean over all training images of class y of the global average
  pool of block 3 of a ConvNet-D3 w128 from the teacher cache (``ddfast.train.get_teacher``); fixed, stored
  as a buffer of the generator. P = Linear(128 → C_z) is trained with G. Measured on Fashion-MNIST: after
  instance norm + ReLU a channel's spatial mean hardly depends on the image, so the ten e_y have pairwise
  cosine similarity ≥ 0.997; they are therefore centred over the classes and unit-normalised before P
  (``centred``, [ours]) (the same near-constancy holds for GAP₃ of φ below, which is why the losses use f₃).
* Generator ([ours]): Linear(2·C_z → W·4·4) → 3 × {(ReLU → Conv3×3 → BN)×2 → nearest ×2} → ReLU →
  Conv3×3 → tanh, 32×32, centre-cropped to 28 for 28 px. Pretrained with DiM's stage-1 loop
  (``dim.gan_iteration``: WGAN-GP + AC, n_critic 1, Adam 1e-4 (0, 0.9), DiM's critic at width W) with
  z ~ N(0, I) in place of codes; cached. Its batch norm is frozen in eval mode during condensation ([ours]),
  so the stored images are the optimised ones.
* Condensation (Alg. 1; sizes [ours]): ``iterations`` rounds, each re-initialising φ (ConvNet-D3,
  instance norm) and running N (``outer_loop``) × {M (``inner_loop``) steps on (Z, G, P); one SGD step of φ
  on real data (CE, lr 0.01, momentum 0)}; the φ step after the last G step of a round is skipped (DC does
  the same: the next round re-initialises φ). Every step uses all K·IPC codes and draws an association of
  A real images per class; real and synthetic images go through one siamese DSA draw per class, then φ:

      L_con = L_adv + L_c + L_f + L_intra + L_inter   (all weights 1)

  f₃ (``--dcgm-feature``, [ours]): φ's flattened pooled block-3 output (the "embed" of the DC/DM code; the paper:
  "the feature from the last layer"); ``gap`` = its global average pool, which hardly varies between images.
  L_adv (Eq. 1): MLP discriminator on [f₃(φ(x)) ; P e_y], BCE, non-saturating G loss, Adam 2e-4
  (0.5, 0.999), one D step per G step, taken first on the detached synthetic features (DCGAN order [ours]);
  the condition P e_y is detached in D's input [ours: it is the label side, shared by real and fake].
  L_c: CE of φ's own classifier on the synthetic images. L_f (Eq. 2): per synthetic image
  Σ_l ‖f_l(x̃) − f̄_l(association of its class)‖² over φ's block outputs after pooling, mean over images;
  ‖·‖² averages over C·H·W (the paper's text calls L_f "the MSE"; a deviation from our first reading of Eq. 2 as a sum,
  ``--lf-reduction sum``). Measured on Fashion-MNIST: with the sum L_f ≈ 5·10³ and its gradient on G has norm
  ≈ 3·10⁴ against a parameter norm of ≈ 30, so the first SGD step (lr 1e-3) saturates G's tanh on every pixel
  and every later gradient is exactly 0; with the mean L_f ≈ 0.6, gradients ≈ 4 and the losses fall.
  L_intra (Eq. 3; these details [ours]): L2-normalised f = f₃ features, positive = normalised mean φ-feature of the
  class's real association, negatives the other IPC − 1 samples of the class, τ = 0.1, mean over samples.
  L_inter (Eq. 4; this scale [ours]): normalised class means of f, margin τ_m = 1, mean over ordered class pairs
  (the paper sums).
  Z: SGD lr 0.01, G and P: SGD lr 0.001, momentum 0.5 both, lr decayed linearly to 0 over the run;
  φ's lr stays constant [ours: φ is re-initialised every round]; φ's CE batch gets its own DSA draw [ours:
  DC trains its net with DSA]; Z starts from N(0, I) [ours: G's pretraining prior]; D is created once and
  kept across φ re-initialisations [ours].

The real association passes φ under no_grad a chunk at a time and only per-class sums of every block
output survive (never [A·K, C, H, W] for the whole association). Outputs: the K·IPC images,
OUT/generator.pt (``ddfast.generators`` file, arch "dcgm"), OUT/codebook.pt (plain tensors; ``synthesize``
regenerates the set from both), and as baseline the pretrained generator sampled with N(0, I) latents.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast import augment, data, generators, judge, models
from ddfast.methods import DistillResult, dim
from ddfast.runner import Loop
from ddfast.selection import class_balanced_subset
from ddfast.train import get_teacher
from ddfast.utils import atomic_torch_save, cache_dir, freeze, progress

Tensor = torch.Tensor

NAME = "dcgm"
EMBED_MODEL, EMBED_WIDTH = "convnet", 128  # [ours] B1/B6.2: the class-embedding extractor, ConvNet-D3 w128
PHI_MODEL = "convnet"  # φ: ConvNet-D3, instance norm (the paper's 3-block ConvNet at 28/32 px)
DISC_BETAS = (0.5, 0.999)  # [ours] B1
# Images per no-grad forward (association pass, class embeddings): a [32, 128, 32, 32] fp32 activation (16 MB)
# stays in cache; 1.2–3× faster than one forward of the whole association (perf/test_dcgm.py). Memory/speed only.
CHUNK = 32
CHECKPOINT_EVERY = 10
POSITIVES = ("real-mean", "class-embedding")
LF_MODES = ("per-sample", "batchmean")
LF_REDUCTIONS = ("sum", "mean")
AUGMENTATIONS = ("dsa", "none")
# What L_intra, L_inter and D see of φ's block 3: "flat" (the flattened pooled output, the "embed" of the DC/DM
# code) or "gap" (its global average pool). Measured (docs/methods/dcgm.md, `python -m ddfast.methods.dcgm --probe`):
# after instance norm + ReLU every channel's spatial mean is ≈ 0.399 for every image, so GAP₃ cannot tell images apart.
FEATURES = ("flat", "gap")

PRESETS: dict[str, dict[str, Any]] = {
    # paper: the spec's §B1 sizes. N = DC's outer_loop, which equals the IPC for every IPC DC defines
    # (1, 10, 20, ..., 50); pretraining = DiM's stage-1 schedule (120 epochs at the code's batch 128) [ours];
    # embedding teacher: 5 epochs on all images [ours: get_teacher's standard recipe].
    "paper": {"gen_width": 128, "gan_iterations": ("epochs", 120, 128), "gan_batch": 128, "teacher_epochs": 5,
              "teacher_images": 0, "iterations": 1000, "outer_loop": None, "batch_real": 256, "net_batch": 256, "net_width": 128},
    # default: the spec's §B5 CPU preset (W 64, A 64, φ step on 128 real, 30 rounds × N = 10 = 300 G steps for
    # every IPC); pretraining shortened from §B5's 3000 iterations to 1000 so that teacher + embeddings + GAN fit
    # 15 min on 2 cores (measured ≈ 1.0 s/iteration on one core of the loaded machine, ≈ 0.6 s estimated on two).
    "default": {"gen_width": 64, "gan_iterations": 1000, "gan_batch": 64, "teacher_epochs": 1, "teacher_images": 20000,
                "iterations": 30, "outer_loop": 10, "batch_real": 64, "net_batch": 128, "net_width": 128},
}


# ----------------------------------------------------------------------------- generator and discriminator


class DCGMGenerator(nn.Module):
    """x̃ = G([z ; P e_y]) ([ours]): Linear(2·C_z → W·4·4) → [W, 4, 4] → 3 × {(ReLU → Conv3×3 → BN)×2 →
    nearest ×2} → ReLU → Conv3×3 W → C → tanh, 32×32, centre-cropped to 28×28 for 28 px datasets.

    ``class_embedding`` [K, embed_dim] is a buffer (fixed, saved in the state dict); P = ``proj`` is learned.
    Constructible from plain kwargs, so ``ddfast.generators.save``/``load`` handle it (arch "dcgm")."""

    def __init__(self, num_classes: int, channels: int = 1, image_size: int = 28, z_dim: int = 100, width: int = 64,
                 embed_dim: int = EMBED_WIDTH) -> None:
        super().__init__()
        if image_size not in (28, 32):
            raise ValueError(f"the DCGM generator is defined for 28 and 32 px images, got {image_size}")
        self.num_classes, self.z_dim, self.width, self.image_size = num_classes, z_dim, width, image_size
        self.register_buffer("class_embedding", torch.zeros(num_classes, embed_dim))
        self.proj = nn.Linear(embed_dim, z_dim)
        self.fc = nn.Linear(2 * z_dim, width * 16)
        layers: list[nn.Module] = []
        for _ in range(3):
            for _ in range(2):
                layers += [nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width)]
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.net = nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh())

    def condition(self, y: Tensor) -> Tensor:
        """P e_y [n, C_z]."""
        return self.proj(self.class_embedding[y.long()])

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, self.condition(y)], 1))
        x = self.net(h.view(z.shape[0], self.width, 4, 4))
        return x[:, :, 2:30, 2:30] if self.image_size == 28 else x


# generators.load builds generators by name; registered here because ddfast.generators does not import methods.
generators.ARCHITECTURES["dcgm"] = DCGMGenerator


class FeatureDiscriminator(nn.Module):
    """D of Eq. 1 on features, not images ([ours]): MLP [f₃(φ(x)) ; P e_y] → hidden → LeakyReLU(0.2) → 1.
    Returns the logit; the sigmoid of the paper's D lives in the BCE (numerically stable, same value)."""

    def __init__(self, feature_dim: int, cond_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim + cond_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, features: Tensor, cond: Tensor) -> Tensor:
        return self.net(torch.cat([features, cond], 1)).squeeze(1)


# ----------------------------------------------------------------------------- losses (each on tensors)


def discriminator_loss(disc: nn.Module, real_feat: Tensor, real_cond: Tensor, fake_feat: Tensor, fake_cond: Tensor) -> Tensor:
    """D's side of Eq. 1 as a loss to minimise: −mean log D(φ(x), c) − mean log(1 − D(φ(x̃), c))."""
    real, fake = disc(real_feat, real_cond), disc(fake_feat, fake_cond)
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def generator_adversarial_loss(disc: nn.Module, fake_feat: Tensor, fake_cond: Tensor) -> Tensor:
    """L_adv for (Z, G): the non-saturating form −mean log D(φ(x̃), c(y)) of Eq. 1's G side [ours]."""
    fake = disc(fake_feat, fake_cond)
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_c: CE of φ's own classifier on the synthetic images [ours]."""
    return F.cross_entropy(logits, labels)


def feature_matching_loss(syn_blocks: list[Tensor], real_means: list[Tensor], labels: Tensor, mode: str = "per-sample",
                          reduction: str = "mean") -> Tensor:
    """L_f (Eq. 2). ``per-sample`` (the paper): mean over synthetic images i of Σ_l ‖f_l(x̃_i) − f̄_l[y_i]‖²;
    ``batchmean`` (CAFE's form): mean over the classes present of Σ_l ‖mean_{i: y_i = y} f_l(x̃_i) − f̄_l[y]‖².
    ``reduction`` of each layer's ‖·‖² over C·H·W: ``sum`` (our first reading of Eq. 2) or ``mean`` (the paper's text: "the MSE").
    ``real_means[l]`` is [K, C, H, W]."""
    if mode == "per-sample":
        rows, targets = syn_blocks, [mu[labels] for mu in real_means]
    else:
        classes, inverse = labels.unique(return_inverse=True)
        counts = torch.bincount(inverse, minlength=len(classes)).to(syn_blocks[0].dtype)
        rows = [f.new_zeros(len(classes), *f.shape[1:]).index_add(0, inverse, f) / counts.view(-1, *[1] * (f.dim() - 1))
                for f in syn_blocks]
        targets = [mu[classes] for mu in real_means]
    per_layer = [((f - t) ** 2).flatten(1) for f, t in zip(rows, targets)]
    return sum(d.sum(1) if reduction == "sum" else d.mean(1) for d in per_layer).mean()


def intra_class_loss(features: Tensor, labels: Tensor, positives: Tensor, tau: float) -> Tensor:
    """L_intra (Eq. 3; normalisation, positive and τ [ours]): with f̂ = f/‖f‖, p̂_y = p_y/‖p_y‖ and e(s) = exp(s/τ), per synthetic sample i
    −log e⟨f̂_i, p̂_{y_i}⟩ / (Σ_{j ≠ i, y_j = y_i} e⟨f̂_i, f̂_j⟩ + e⟨f̂_i, p̂_{y_i}⟩), mean over samples.
    ``positives`` [K, D] is indexed by label; identically 0 when every class has one sample."""
    f = F.normalize(features, dim=1)
    pos = (f * F.normalize(positives, dim=1)[labels]).sum(1, keepdim=True) / tau
    negatives = labels[:, None] == labels[None, :]
    negatives.fill_diagonal_(False)
    neg = (f @ f.T / tau).masked_fill(~negatives, float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos.squeeze(1)).mean()


def inter_class_loss(features: Tensor, labels: Tensor, margin: float) -> Tensor:
    """L_inter (Eq. 4; normalisation and averaging [ours]): m_c = normalised mean of class c's features, over the classes present;
    mean over ordered pairs c_A ≠ c_B of max(τ_m − ‖m_A − m_B‖, 0) (the paper sums; we average)."""
    classes, inverse = labels.unique(return_inverse=True)
    if len(classes) < 2:
        return features.sum() * 0
    # normalising the class sum is normalising the class mean
    m = F.normalize(features.new_zeros(len(classes), features.shape[1]).index_add(0, inverse, features), dim=1)
    a, b = (~torch.eye(len(classes), dtype=torch.bool)).nonzero().T  # off-diagonal pairs only: no ‖0‖ in the graph
    return (margin - torch.linalg.vector_norm(m[a] - m[b], dim=1)).clamp_min(0).mean()


# ----------------------------------------------------------------------------- φ passes


def phi_outputs(net: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """(block outputs after pooling, logits) of a ``ddfast.models`` ConvNet: L_f's f_l ([ours])."""
    blocks, h = [], x
    for layer in net.features:
        h = layer(h)
        if isinstance(layer, (nn.AvgPool2d, nn.MaxPool2d)):
            blocks.append(h)
    return blocks, net.classifier(h.flatten(1))


def block3_feature(block: Tensor, feature: str) -> Tensor:
    """[n, D] what L_intra, L_inter and D see of φ's last pooled block output [n, C, h, w] (``FEATURES``)."""
    if feature == "flat":
        return block.flatten(1)
    if feature == "gap":
        return block.mean((2, 3))
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")


@torch.no_grad()
def feature_dim(phi: nn.Module, dataset: data.Dataset, feature: str) -> int:
    """D's feature width for φ on this dataset (one dry forward of a blank image)."""
    blocks, _ = phi_outputs(phi, torch.zeros(1, dataset.channels, *dataset.image_size))
    return block3_feature(blocks[-1], feature).shape[1]


@dataclasses.dataclass
class RealStats:
    means: list[Tensor]  # per block [K, C, H, W]: class means of φ's block outputs over the association
    counts: Tensor  # [K]
    features: Tensor  # [n, D]: block-3 feature (``block3_feature``) of every association image (D's real input)


@torch.no_grad()
def real_statistics(net: nn.Module, x: Tensor, labels: Tensor, num_classes: int, chunk: int = CHUNK,
                    feature: str = "flat") -> RealStats:
    """The association's pass through φ, ``chunk`` images at a time: each chunk's block outputs are added
    into per-class float64 sums and dropped, so at most [chunk, C, H, W] activations live at once."""
    sums: list[Tensor] = []
    features = []
    for start in range(0, x.shape[0], chunk):
        y = labels[start:start + chunk]
        blocks, _ = phi_outputs(net, x[start:start + chunk])
        if not sums:
            sums = [torch.zeros(num_classes, *b.shape[1:], dtype=torch.float64) for b in blocks]
        for s, b in zip(sums, blocks):
            s.index_add_(0, y, b.double())
        features.append(block3_feature(blocks[-1], feature))
        del blocks
    counts = torch.bincount(labels, minlength=num_classes)
    means = [(s / counts.clamp_min(1).view(-1, *[1] * (s.dim() - 1))).to(x.dtype) for s in sums]
    return RealStats(means, counts, torch.cat(features))


@torch.no_grad()
def class_embeddings(extractor: nn.Module, dataset: data.Dataset, batch: int = CHUNK) -> Tensor:
    """e_y [K, C] = mean over all training images of class y of the spatial mean of the extractor's last
    block (the "spatially pooled lowest-resolution feature", [ours])."""
    extractor.eval()
    k, n = dataset.num_classes, len(dataset.train_labels)
    sums: Tensor | None = None
    for start in progress(range(0, n, batch), desc="DCGM class embeddings", unit="batch"):
        feat = extractor.features(dataset.normalize(dataset.train_images[start:start + batch])).mean((2, 3)).double()
        sums = (torch.zeros(k, feat.shape[1], dtype=torch.float64) if sums is None else sums).index_add_(
            0, dataset.train_labels[start:start + batch], feat)
    counts = torch.bincount(dataset.train_labels, minlength=k).clamp_min(1)
    return (sums / counts[:, None]).float()


def centred(embeddings: Tensor) -> Tensor:
    """[ours] e_y − mean_y' e_y', scaled to unit norm per class: the raw class means of an instance-norm
    ConvNet's pooled features have pairwise cosine ≥ 0.997 on Fashion-MNIST, which leaves P almost no class
    signal to amplify; centring keeps exactly the between-class differences."""
    return F.normalize(embeddings - embeddings.mean(0, keepdim=True), dim=1)


# ----------------------------------------------------------------------------- configuration


# options of other methods' groups that this method reads too (ddfast.distill rejects the rest of theirs)
OTHER_OPTIONS = ("batch_real", "gan_batch", "gan_iterations", "gen_width", "lr_gen", "z_dim")

def add_arguments(group: argparse._ArgumentGroup) -> None:
    """dcgm options. Shared ones keep their names: --preset, --iterations (φ re-initialisations), --gen-width
    (G and pretraining critic), --z-dim (C_z), --lr-gen (G and P), --net-width (φ), --batch-real (association A
    per class), --gan-iterations / --gan-batch (pretraining), --teacher-epochs / --teacher-images (embedding net)."""
    group.add_argument("--outer-loop", type=int, default=None,
                       help="dcgm: N, φ steps (each after --inner-loop G steps) per φ re-initialisation (paper preset: the IPC, "
                       "DC's outer_loop; default 10)")
    group.add_argument("--inner-loop", type=int, default=1, help="dcgm: M, G steps between two φ steps (1)")
    group.add_argument("--net-batch", type=int, default=None, help="dcgm: real images per φ SGD step (paper preset 256, default 128)")
    group.add_argument("--lr-code", type=float, default=0.01, help="dcgm: SGD learning rate of the codebook Z (0.01, the paper)")
    group.add_argument("--lr-phi", type=float, default=0.01, help="dcgm: SGD learning rate of φ, momentum 0 (0.01, the paper)")
    group.add_argument("--dcgm-momentum", type=float, default=0.5, help="dcgm: SGD momentum of Z and G (0.5, DC's image optimiser)")
    group.add_argument("--lr-disc", type=float, default=2e-4, help="dcgm: Adam (0.5, 0.999) learning rate of the feature discriminator (2e-4)")
    group.add_argument("--disc-hidden", type=int, default=256, help="dcgm: hidden width of the feature discriminator MLP (256)")
    group.add_argument("--intra-tau", type=float, default=0.1, help="dcgm: temperature τ of L_intra (0.1)")
    group.add_argument("--inter-margin", type=float, default=1.0, help="dcgm: margin τ_m of L_inter on normalised class means (1.0)")
    group.add_argument("--intra-positive", choices=POSITIVES, default="real-mean",
                       help="dcgm: L_intra's positive: the normalised mean φ-feature of the class's real association (default) or "
                       "the class embedding e_y, the literal reading (needs --net-width 128)")
    group.add_argument("--dcgm-feature", choices=FEATURES, default="flat",
                       help="dcgm: what L_intra, L_inter and the discriminator see of φ's block 3: its flattened pooled output "
                       "(flat, default: the DC/DM code's embed) or its global average pool (gap: ≈ the same vector for every image "
                       "after instance norm, measured)")
    group.add_argument("--lf", choices=LF_MODES, default="per-sample",
                       help="dcgm: L_f per synthetic image to its association's mean (the paper) or class batch mean to mean (CAFE)")
    group.add_argument("--lf-reduction", choices=LF_REDUCTIONS, default="mean",
                       help="dcgm: each layer's squared distance in L_f summed over C·H·W (sum, our first reading of the paper's Eq. 2) or averaged (mean, the "
                       "paper's \"MSE\")")
    group.add_argument("--dcgm-aug", choices=AUGMENTATIONS, default="dsa",
                       help="dcgm: siamese DSA on real and synthetic images before φ and on φ's training batch (dsa) or none")


@dataclasses.dataclass
class Config:
    ipc: int
    width: int  # G and pretraining-critic width W
    z_dim: int  # C_z
    gan_iterations: int
    gan_batch: int
    teacher_epochs: int
    teacher_images: int
    iterations: int  # φ re-initialisations
    outer_loop: int  # N
    inner_loop: int  # M
    batch_real: int  # association size A per class
    net_batch: int
    net_width: int
    lr_code: float
    lr_gen: float
    lr_phi: float
    momentum: float
    lr_disc: float
    disc_hidden: int
    intra_tau: float
    inter_margin: float
    intra_positive: str
    feature: str
    lf: str
    lf_reduction: str
    aug: str
    seed: int

    @property
    def steps_per_round(self) -> int:
        return self.outer_loop * self.inner_loop

    @property
    def steps(self) -> int:
        return self.iterations * self.steps_per_round

    def generator_kwargs(self, dataset: data.Dataset) -> dict[str, Any]:
        return {"num_classes": dataset.num_classes, "channels": dataset.channels, "image_size": dataset.image_size[0],
                "z_dim": self.z_dim, "width": self.width, "embed_dim": EMBED_WIDTH}


def resolve_config(args: argparse.Namespace, dataset: data.Dataset) -> Config:
    """Fill preset defaults and reject bad arguments before any work starts."""
    preset, n = PRESETS[args.preset], len(dataset.train_labels)
    pick = lambda value, key: dim.preset_iterations(preset[key], n) if value is None else value  # noqa: E731
    outer = args.outer_loop if args.outer_loop is not None else (preset["outer_loop"] or args.ipc)
    config = Config(
        ipc=args.ipc, width=pick(args.gen_width, "gen_width"), z_dim=args.z_dim, gan_iterations=pick(args.gan_iterations, "gan_iterations"),
        gan_batch=pick(args.gan_batch, "gan_batch"), teacher_epochs=pick(args.teacher_epochs, "teacher_epochs"),
        teacher_images=pick(args.teacher_images, "teacher_images"), iterations=pick(args.iterations, "iterations"), outer_loop=outer,
        inner_loop=args.inner_loop, batch_real=pick(args.batch_real, "batch_real"), net_batch=pick(args.net_batch, "net_batch"),
        net_width=pick(args.net_width, "net_width"), lr_code=args.lr_code, lr_gen=1e-3 if args.lr_gen is None else args.lr_gen,
        lr_phi=args.lr_phi, momentum=args.dcgm_momentum, lr_disc=args.lr_disc, disc_hidden=args.disc_hidden, intra_tau=args.intra_tau,
        inter_margin=args.inter_margin, intra_positive=args.intra_positive, feature=args.dcgm_feature, lf=args.lf,
        lf_reduction=args.lf_reduction, aug=args.dcgm_aug, seed=args.seed,
    )
    for name, value in (("--gen-width", config.width), ("--z-dim", config.z_dim), ("--gan-iterations", config.gan_iterations),
                        ("--gan-batch", config.gan_batch), ("--teacher-epochs", config.teacher_epochs), ("--iterations", config.iterations),
                        ("--outer-loop", config.outer_loop), ("--inner-loop", config.inner_loop), ("--batch-real", config.batch_real),
                        ("--net-batch", config.net_batch), ("--net-width", config.net_width), ("--disc-hidden", config.disc_hidden)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if config.teacher_images < 0:
        raise ValueError(f"--teacher-images must be >= 0 (0 = all), got {config.teacher_images}")
    for name, value in (("--lr-code", config.lr_code), ("--lr-gen", config.lr_gen), ("--lr-phi", config.lr_phi),
                        ("--lr-disc", config.lr_disc), ("--intra-tau", config.intra_tau)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not 0 <= config.momentum < 1:
        raise ValueError(f"--dcgm-momentum must be in [0, 1), got {config.momentum}")
    if config.inter_margin < 0:
        raise ValueError(f"--inter-margin must be >= 0, got {config.inter_margin}")
    if args.segment:
        raise ValueError("dcgm couples its synthetic images (L_intra, L_inter, one generator pass); drop --segment")
    side = dataset.image_size
    if side[0] != side[1] or side[0] not in (28, 32):
        raise ValueError(f"the DCGM generator and DiM's pretraining critic are defined for 28×28 and 32×32 images, got {side[0]}×{side[1]}")
    if max(config.gan_batch, config.net_batch) > n:
        raise ValueError(f"--gan-batch/--net-batch {max(config.gan_batch, config.net_batch)} exceeds the {n} training images")
    smallest = int(torch.bincount(dataset.train_labels, minlength=dataset.num_classes).min())
    if config.batch_real > smallest:
        raise ValueError(f"--batch-real {config.batch_real} exceeds the smallest class ({smallest} training images)")
    if config.intra_positive == "class-embedding" and config.feature != "gap":
        raise ValueError("--intra-positive class-embedding compares GAP₃ features with the class embedding: needs --dcgm-feature gap")
    if config.intra_positive == "class-embedding" and config.net_width != EMBED_WIDTH:
        raise ValueError(f"--intra-positive class-embedding compares φ features with the {EMBED_WIDTH}-d class embedding: "
                         f"needs --net-width {EMBED_WIDTH}, got {config.net_width}")
    return config


# ----------------------------------------------------------------------------- pretraining (cached)


def pretrained_path(dataset: data.Dataset, config: Config) -> Path:
    name = (f"dcgm-w{config.width}-z{config.z_dim}-it{config.gan_iterations}-b{config.gan_batch}-s{config.seed}"
            f"-emb{EMBED_MODEL}{EMBED_WIDTH}e{config.teacher_epochs}n{config.teacher_images}")
    return cache_dir() / "generators" / dataset.name / f"{name}.pt"


def pretrain(dataset: data.Dataset, config: Config) -> Path:
    """Class embeddings, then DiM's stage-1 GAN loop on the DCGM generator with z ~ N(0, I) ([ours]).
    Cached by its arguments; checkpointed every 50 iterations (the embedding rides in G's state dict), so
    a killed run re-run with the same arguments resumes and ends with the same weights."""
    path = pretrained_path(dataset, config)
    if path.is_file():
        return path
    pair = judge.get_judge(dataset)  # first: training it reseeds the global RNG, which the lines below then set
    kwargs = config.generator_kwargs(dataset)
    torch.manual_seed(config.seed)
    g = DCGMGenerator(**kwargs)
    d = generators.DiMCritic(dataset.num_classes, dataset.channels, dataset.image_size[0], config.width)
    opt_g, opt_d = dim.stage1_adam(g), dim.stage1_adam(d)  # Adam 1e-4, betas (0, 0.9): DiM's stage 1
    loop, saved = generators.cached_training_loop(path, config.gan_iterations, config.gan_iterations,
                                                  f"DCGM generator pretraining ({dataset.name})", every=50)
    if saved is not None:  # the embedding rides in G's state dict
        teacher_acc = saved["teacher_acc"]
    else:
        extractor, teacher_acc = get_teacher(dataset, EMBED_MODEL, EMBED_WIDTH, config.teacher_epochs, seed=0,
                                             train_images=config.teacher_images)
        g.class_embedding.copy_(centred(class_embeddings(extractor, dataset)))
    curve = dim.train_stage1(loop, saved, pair, g, d, opt_g, opt_d, dataset, config.gan_batch, config.seed,
                             extra={"teacher_acc": teacher_acc})
    generators.finish_cached_training(loop, path, g, "dcgm", kwargs, {
        "dataset": dataset.name, "stage": "dcgm pretraining (DiM stage-1 GAN)", "method_config": dataclasses.asdict(config),
        "embedding_teacher_test_acc": teacher_acc, "judge_curve": curve, "class_names": list(dataset.class_names),
        "normalization": {"mean": list(dataset.mean), "std": list(dataset.std)}})
    return path


# ----------------------------------------------------------------------------- condensation


@dataclasses.dataclass
class State:
    """Everything a condensation step changes (and a checkpoint stores)."""
    codes: Tensor  # Z [IPC, C_z], a leaf
    generator: DCGMGenerator  # eval mode throughout: batch norm frozen (B6.1)
    disc: FeatureDiscriminator
    opt_code: torch.optim.SGD
    opt_gen: torch.optim.SGD
    opt_disc: torch.optim.Adam
    phi: nn.Module
    opt_phi: torch.optim.SGD

    def state_dict(self) -> dict[str, Any]:
        return {"codes": self.codes.detach().clone(), "generator": self.generator.state_dict(), "disc": self.disc.state_dict(),
                "opt_code": self.opt_code.state_dict(), "opt_gen": self.opt_gen.state_dict(), "opt_disc": self.opt_disc.state_dict(),
                "phi": self.phi.state_dict(), "opt_phi": self.opt_phi.state_dict()}

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        with torch.no_grad():
            self.codes.copy_(blob["codes"])
        for name in ("generator", "disc", "opt_code", "opt_gen", "opt_disc", "phi", "opt_phi"):
            getattr(self, name).load_state_dict(blob[name])


def new_phi(dataset: data.Dataset, config: Config, round_: int) -> tuple[nn.Module, torch.optim.SGD]:
    """φ of round ``round_``: a fresh ConvNet-D3 (instance norm), its init drawn from the round's seed so a
    resumed run rebuilds it; SGD lr ``lr_phi``, momentum 0 ([ours]: DC's net optimiser)."""
    torch.manual_seed(config.seed * 1_000_033 + round_)
    phi = models.create(PHI_MODEL, dataset.channels, dataset.num_classes, dataset.image_size, width=config.net_width).train()
    return phi, torch.optim.SGD(phi.parameters(), lr=config.lr_phi, momentum=0.0)


def new_state(dataset: data.Dataset, config: Config, pretrained: Path) -> State:
    g, _ = generators.load(pretrained)  # eval mode
    gen = torch.Generator().manual_seed(config.seed)
    codes = torch.randn(config.ipc, config.z_dim, generator=gen).requires_grad_(True)  # [ours] Z from N(0, I), G's pretraining prior
    phi, opt_phi = new_phi(dataset, config, 0)  # seeds itself
    torch.manual_seed(config.seed * 1_000_037)
    disc = FeatureDiscriminator(feature_dim(phi, dataset, config.feature), config.z_dim, config.disc_hidden)
    return State(codes=codes, generator=g, disc=disc,
                 opt_code=torch.optim.SGD([codes], lr=config.lr_code, momentum=config.momentum),
                 opt_gen=torch.optim.SGD(g.parameters(), lr=config.lr_gen, momentum=config.momentum),
                 opt_disc=torch.optim.Adam(disc.parameters(), lr=config.lr_disc, betas=DISC_BETAS), phi=phi, opt_phi=opt_phi)


def synthesize(generator: nn.Module, codes: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(tanh images [K·IPC, C, H, W], labels) of every code with every class, class-major."""
    labels = torch.arange(num_classes).repeat_interleave(codes.shape[0])
    return generator(codes.repeat(num_classes, 1), labels), labels


def condense_step(state: State, dataset: data.Dataset, config: Config, step: int) -> dict[str, float]:
    """One (D, (Z, G)) update of Alg. 1's inner loop; everything random comes from the step's seed."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    k = dataset.num_classes
    idx = class_balanced_subset(dataset.train_labels, k, config.batch_real, int(torch.randint(2**31, (1,), generator=gen)))
    xr, yr = dataset.normalize(dataset.train_images[idx]), dataset.train_labels[idx]
    raw, ys = synthesize(state.generator, state.codes, k)
    xs = generators.to_dataset_space(raw, dataset.mean, dataset.std)
    if config.aug == "dsa":  # one draw per class shared by its real and synthetic images (siamese)
        xr, xs = augment.siamese_dsa(xr, xs, yr, ys, k, gen)
    freeze(state.phi, True)  # L_con moves (Z, G) only; φ learns from real data alone
    real = real_statistics(state.phi, xr, yr, k, feature=config.feature)
    syn_blocks, logits = phi_outputs(state.phi, xs)
    f_syn = block3_feature(syn_blocks[-1], config.feature)
    cond = state.generator.condition(torch.arange(k)).detach()  # P e_y: the label side of D, for real and fake alike
    freeze(state.disc, False)
    loss_d = discriminator_loss(state.disc, real.features, cond[yr], f_syn.detach(), cond[ys])
    state.opt_disc.zero_grad(set_to_none=True)
    loss_d.backward()
    state.opt_disc.step()
    freeze(state.disc, True)
    if config.intra_positive == "real-mean":
        positives = block3_feature(real.means[-1], config.feature)  # = the class mean of the association's features
    else:
        positives = state.generator.class_embedding
    losses = {"adv": generator_adversarial_loss(state.disc, f_syn, cond[ys]), "c": classification_loss(logits, ys),
              "f": feature_matching_loss(syn_blocks, real.means, ys, config.lf, config.lf_reduction),
              "intra": intra_class_loss(f_syn, ys, positives, config.intra_tau),
              "inter": inter_class_loss(f_syn, ys, config.inter_margin)}
    state.opt_code.zero_grad(set_to_none=True)
    state.opt_gen.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    state.opt_code.step()
    state.opt_gen.step()
    if phi_step_due(step, config):
        phi_step(state, dataset, config, gen)
    return {**{name: float(v.detach()) for name, v in losses.items()}, "d": float(loss_d.detach())}


def phi_step_due(step: int, config: Config) -> bool:
    """Whether G step ``step`` ends one of Alg. 1's N inner loops (M G steps) other than a round's last: after
    the last one φ is re-initialised anyway, so its SGD step is skipped (DC's loop breaks there too)."""
    position = step % config.steps_per_round + 1
    return position % config.inner_loop == 0 and position < config.steps_per_round


def phi_step(state: State, dataset: data.Dataset, config: Config, gen: torch.Generator) -> None:
    """Alg. 1's "θ ← θ − ∇L_cls(T)": one SGD step of φ on ``net_batch`` random real images (CE, DSA when on)."""
    idx = torch.randperm(len(dataset.train_labels), generator=gen)[:config.net_batch]
    x = dataset.normalize(dataset.train_images[idx])
    if config.aug == "dsa":
        x = augment.dsa(x, generator=gen)
    freeze(state.phi, False)
    loss = F.cross_entropy(state.phi(x), dataset.train_labels[idx])
    state.opt_phi.zero_grad(set_to_none=True)
    loss.backward()
    state.opt_phi.step()


def _set_lr(state: State, config: Config, step: int) -> None:
    """Linear decay to 0 over the run for Z and G ([ours]; the paper: "linear epoch decay")."""
    factor = 1 - step / config.steps
    for opt, lr in ((state.opt_code, config.lr_code), (state.opt_gen, config.lr_gen)):
        for group in opt.param_groups:
            group["lr"] = lr * factor


# ----------------------------------------------------------------------------- the method


def distill(args: argparse.Namespace, dataset: data.Dataset) -> DistillResult:
    config = resolve_config(args, dataset)
    print(_describe(config, args.preset))
    out = Path(args.out_dir)
    timing = {"pretraining": 0.0, "condensation": 0.0, "sampling": 0.0}
    t0 = time.time()
    pretrained = pretrain(dataset, config)
    timing["pretraining"] = time.time() - t0
    state = new_state(dataset, config, pretrained)
    loop = Loop(out / "checkpoint" / "dcgm.pt", dataclasses.asdict(config), config.steps, f"DCGM condensation IPC {config.ipc}",
                every=CHECKPOINT_EVERY, unit="step")
    saved = loop.resume()
    if saved is not None:
        state.phi, state.opt_phi = new_phi(dataset, config, loop.first // config.steps_per_round)
        state.load_state_dict(saved)

    def step(it: int) -> dict[str, float]:
        if it % config.steps_per_round == 0:  # Alg. 1: "initialize network parameter θ"
            state.phi, state.opt_phi = new_phi(dataset, config, it // config.steps_per_round)
        _set_lr(state, config, it)
        return condense_step(state, dataset, config, it)

    loop.run(step, state.state_dict)
    timing["condensation"] = loop.seconds
    t2 = time.time()
    k = dataset.num_classes
    g = state.generator.eval()
    with torch.no_grad():
        raw, labels = synthesize(g, state.codes, k)
    images = generators.to_dataset_space(raw, dataset.mean, dataset.std)
    meta = {"dataset": dataset.name, "stage": "dcgm", "method_config": dataclasses.asdict(config), "pretrained": str(pretrained),
            "codebook": str(out / "codebook.pt"), "class_names": list(dataset.class_names),
            "normalization": {"mean": list(dataset.mean), "std": list(dataset.std)}}
    generators.save(out / "generator.pt", g, "dcgm", config.generator_kwargs(dataset), meta)
    atomic_torch_save({"codes": state.codes.detach().clone(), "num_classes": k}, out / "codebook.pt")
    base, pretrained_meta = generators.load(pretrained)
    base_images, base_labels = generators.sample(base, k, config.ipc, config.seed, dataset.mean, dataset.std)
    timing["sampling"] = time.time() - t2
    stats_out = {"seconds_per_iteration": loop.seconds_per_iteration, "time_split_seconds": timing,
                 "generator": str(out / "generator.pt"), "codebook": str(out / "codebook.pt"), "pretrained_generator": str(pretrained),
                 "pretraining_judge_curve": pretrained_meta.get("judge_curve"),
                 "method_config": dataclasses.asdict(config)}
    return DistillResult(images=images, labels=labels, stats=stats_out, baseline=DistillResult(images=base_images, labels=base_labels),
                         baseline_name="pretrained generator")


def _describe(config: Config, preset: str) -> str:
    c = config
    aug = "siamese DSA (one draw per class) on real and synthetic images, DSA on φ's batch" if c.aug == "dsa" else "no augmentation"
    positive = "normalised mean φ-feature of the class's real association" if c.intra_positive == "real-mean" else "class embedding e_y"
    return (
        f"dcgm ({preset} preset): codebook Z [{c.ipc}×{c.z_dim}] from N(0, I) shared by all classes; generator [ours] W {c.width}, "
        f"input [z ; P e_y], e_y = class mean of GAP(block 3) of a ConvNet-D3 w{EMBED_WIDTH} teacher ({c.teacher_epochs} epoch(s), "
        f"teacher images {c.teacher_images or 'all'}), pretrained {c.gan_iterations} DiM stage-1 iterations (WGAN-GP + AC, Adam 1e-4 "
        f"(0, 0.9), critic W {c.width}) at batch {c.gan_batch}, batch norm frozen (eval) during condensation; {c.iterations} φ re-inits × "
        f"N {c.outer_loop} × M {c.inner_loop} = {c.steps} steps, all {c.ipc} codes × every class per step, φ = ConvNet-D3 "
        f"w{c.net_width} instance norm, one SGD step (lr {c.lr_phi:g}, momentum 0, CE) on {c.net_batch} real images after every M "
        f"steps except a round's last; association {c.batch_real} real images per class; {aug}; L_con = L_adv + L_c + L_f + "
        f"L_intra + L_inter on {'flattened block-3 output' if c.feature == 'flat' else 'GAP₃'}: D = MLP [f₃ ; P e_y] → {c.disc_hidden} → LeakyReLU 0.2 → 1, BCE, non-saturating, Adam {c.lr_disc:g} "
        f"{DISC_BETAS}, one D step first per step; L_c = CE of φ's classifier; L_f {c.lf} over φ's 3 pooled block outputs "
        f"({c.lf_reduction} over C·H·W); "
        f"L_intra τ {c.intra_tau:g}, positive = {positive}; L_inter margin {c.inter_margin:g} on normalised class means, mean over "
        f"ordered pairs; SGD Z lr {c.lr_code:g}, G+P lr {c.lr_gen:g}, momentum {c.momentum:g}, linear decay to 0; checkpoint every "
        f"{CHECKPOINT_EVERY} steps"
    )


# ----------------------------------------------------------------------------- the feature probe (docs/methods/dcgm.md)


def feature_probe(dataset: data.Dataset, per_class: int = 10, association: int = 64, net_width: int = 128, tau: float = 0.1,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """Can a feature tell images apart? On ``per_class`` real images per class (standing in for the synthetic set)
    and a fresh φ (ConvNet-D3 w``net_width``, instance norm), per entry of ``FEATURES``: the mean pairwise cosine
    of the features (same class, different class), L_intra (positive = the class mean over ``association`` real
    images per class) and the input-gradient norms of L_intra, L_inter, L_f and L_c (one φ, one draw)."""
    k = dataset.num_classes
    idx = class_balanced_subset(dataset.train_labels, k, per_class, seed)
    x, y = dataset.normalize(dataset.train_images[idx]), dataset.train_labels[idx]
    assoc = class_balanced_subset(dataset.train_labels, k, association, seed + 1)
    torch.manual_seed(seed)
    phi = models.create(PHI_MODEL, dataset.channels, k, dataset.image_size, width=net_width).train()
    same = y[:, None] == y[None, :]
    off_diagonal = ~torch.eye(len(y), dtype=torch.bool)

    def grad_norm(loss: Tensor, inp: Tensor) -> float:
        (g,) = torch.autograd.grad(loss, inp, retain_graph=True)
        return float(g.norm())

    out = {}
    for feature in FEATURES:
        real = real_statistics(phi, dataset.normalize(dataset.train_images[assoc]), dataset.train_labels[assoc], k, feature=feature)
        xs = x.clone().requires_grad_(True)
        blocks, logits = phi_outputs(phi, xs)
        f = block3_feature(blocks[-1], feature)
        fn = F.normalize(f.detach().double(), dim=1)
        cos = fn @ fn.T
        intra = intra_class_loss(f, y, block3_feature(real.means[-1], feature), tau)
        out[feature] = {
            "dim": f.shape[1], "cos_same_class": float(cos[same & off_diagonal].mean()), "cos_other_class": float(cos[~same].mean()),
            "intra": float(intra.detach()), "grad_intra": grad_norm(intra, xs), "grad_inter": grad_norm(inter_class_loss(f, y, 1.0), xs),
            "grad_f": grad_norm(feature_matching_loss(blocks, real.means, y), xs), "grad_c": grad_norm(classification_loss(logits, y), xs),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.methods.dcgm", description="DCGM's feature probe (see feature_probe)")
    parser.add_argument("--probe", action="store_true", required=True, help="run the probe and print one row per feature")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--seeds", type=int, default=3, help="φ/image draws averaged (default 3)")
    args = parser.parse_args(argv)
    dataset = data.load(args.dataset)
    runs = [feature_probe(dataset, seed=s) for s in range(args.seeds)]
    keys = list(runs[0][FEATURES[0]])
    print("| feature | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for feature in FEATURES:
        cells = [f"{sum(r[feature][key] for r in runs) / len(runs):.4g}" for key in keys]
        print(f"| {feature} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
