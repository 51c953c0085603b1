"""APM — dataset distillation via adversarial prediction matching (Chen et al. 2023, arXiv 2312.08912; docs/methods/apm.md).

Every mid_gap+1 rounds a fresh student trains E epochs on the current synthetic images with L1 to a
teacher's logits on the clean images (DSA on its inputs) and K checkpoints are kept; every round the
images move along −∇ of L_u = (1/B) Σ_i [Σ_k φ(‖f_Sk(u_i) − f_T(u_i)‖₁) + α·CE(f_T(u_i), y_i)] (K4,
``ddfast.ops.apm_loss``), i.e. towards where the checkpoints disagree with the teacher.

Fast path (the default backends): the teacher once per segment and the K checkpoints (one ``torch.func``
vmap over stacked parameters on CUDA, a loop on CPU where that is faster), every network frozen (no
weight gradients), K4 for the head, all through one ``torch.compile``d forward; the student trained
through a compiled loss on whole-batch tensors with no DataLoader and no host syncs. ``--impl official`` runs the
same method written like the official ``mchen725/DD_APM`` distill.py (teacher re-forwarded for every
checkpoint, parameters left trainable, a DataLoader and per-batch ``.item()``/numpy syncs per retrain):
the baseline of the perf rows.

Deliberate differences from the official code (docs/methods/apm.md, "APM defaults vs the official code"): exactly E student
epochs with checkpoints after round(jE/K) (official: E+1 epochs, after E/K+1, ...); R rounds (official
R+1); the mini-batch subset is drawn once per retrain cycle (official: every round, which pairs
checkpoints with images they did not see when B < N); the soft labels are the logits of the teacher of
the last round, not of a second teacher drawn at evaluation; teachers keep their final epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast import augment, data, distributed, models
from ddfast.methods import DistillResult
from ddfast.ops import apm_loss
from ddfast.runner import Loop
from ddfast.selection import class_balanced_subset
from ddfast.train import TrainConfig, cached_fit, random_subset, teacher_path
from ddfast.utils import PeakMemory, seed_everything

NAME = "apm"
MODEL = "convnet"  # ConvNet-D3, instance norm, as the official code
CHECKPOINT_EVAL = ("auto", "vmap", "loop")

PRESETS = {
    # paper: the official pool (100 teachers x 100 epochs, template.sh) and the CIFAR-10 script values.
    # lr_img_per_image: γ/B (None = the official γ = 1 for any B).
    "paper": {"iterations": 2500, "teachers": 100, "teacher_epochs": 100, "teacher_images": 0, "net_width": 128,
              "student_epochs": 250, "mid_gap": 2, "lr_img_per_image": None},
    # default: sized for 2 CPU cores (IPC 10 in about half an hour, teachers included; docs/methods/apm.md).
    "default": {"iterations": 300, "teachers": 5, "teacher_epochs": 5, "teacher_images": 20000, "net_width": 32,
                "student_epochs": 250, "mid_gap": 2, "lr_img_per_image": 0.01},
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """apm options; --preset, --iterations (rounds R), --teacher-epochs, --teacher-images, --alpha, --net-width and --lr-img
    are shared (ddfast.distill)."""
    group.add_argument("--teachers", type=int, default=None, help="teacher pool size (default from --preset: 100 paper)")
    group.add_argument("--student-epochs", type=int, default=None, help="epochs E of every student (default from --preset: 250 paper)")
    group.add_argument("--checkpoints", type=int, default=5, help="student checkpoints K kept after epochs round(jE/K) (5)")
    group.add_argument("--mid-gap", type=int, default=None, help="rounds between student retrains minus one (default from --preset: 2)")
    group.add_argument("--apm-distance", choices=("l1", "log"), default="l1",
                       help="φ of the checkpoint distance: l1 = −L1/C (the official code, default), log = −log(L1 + ε) (the paper)")
    group.add_argument("--apm-eps", type=float, default=1e-8, help="ε of --apm-distance log (1e-8)")
    group.add_argument("--lr-net", type=float, default=0.02, help="student SGD learning rate (0.02, the CIFAR-10 script)")
    group.add_argument("--checkpoint-eval", choices=CHECKPOINT_EVAL, default="auto",
                       help="how the K checkpoints run in the image update: vmap over stacked parameters or a loop "
                       "(auto: vmap on CUDA, loop on CPU where it is 1.2-1.8x faster; same result)")
    group.add_argument("--compile", dest="apm_compile", action=argparse.BooleanOptionalAction, default=True,
                       help="run the students' training loss and the image update's networks through torch.compile (default on; "
                       "--no-compile for eager, e.g. where inductor has no C++ compiler)")
    group.add_argument("--batch-syn", type=int, default=None, help="synthetic images B per round (default: all N = classes × IPC)")


@dataclasses.dataclass
class Config:
    ipc: int
    iterations: int
    teachers: int
    teacher_epochs: int
    teacher_images: int
    net_width: int
    student_epochs: int
    checkpoints: int
    mid_gap: int
    alpha: float
    distance: str
    eps: float
    lr_img: float
    img_momentum: float
    lr_net: float
    batch_syn: int
    batch_train: int
    checkpoint_eval: str
    compile: bool
    segment: int
    official: bool  # --impl official: the official code's pipeline
    seed: int

    @property
    def checkpoint_epochs(self) -> list[int]:
        """Epoch counts after which a checkpoint is kept: round(jE/K), j = 1..K (deduplicated)."""
        return sorted({max(1, round(j * self.student_epochs / self.checkpoints)) for j in range(1, self.checkpoints + 1)})


def resolve_config(args: argparse.Namespace, num_classes: int) -> Config:
    """Fill preset defaults and reject bad arguments before any work starts."""
    preset = PRESETS[args.preset]
    pick = lambda value, key: preset[key] if value is None else value  # noqa: E731
    n = num_classes * args.ipc
    batch_syn = n if args.batch_syn is None else args.batch_syn
    per_image = preset["lr_img_per_image"]
    lr_img = args.lr_img if args.lr_img is not None else (1.0 if per_image is None else per_image * batch_syn)
    config = Config(
        ipc=args.ipc, iterations=pick(args.iterations, "iterations"), teachers=pick(args.teachers, "teachers"),
        teacher_epochs=pick(args.teacher_epochs, "teacher_epochs"), teacher_images=pick(args.teacher_images, "teacher_images"),
        net_width=pick(args.net_width, "net_width"), student_epochs=pick(args.student_epochs, "student_epochs"),
        checkpoints=args.checkpoints, mid_gap=pick(args.mid_gap, "mid_gap"), alpha=0.1 if args.alpha is None else args.alpha,
        distance=args.apm_distance, eps=args.apm_eps, lr_img=lr_img, img_momentum=0.5, lr_net=args.lr_net,
        batch_syn=batch_syn, batch_train=256, checkpoint_eval=args.checkpoint_eval,
        compile=args.apm_compile, segment=args.segment,
        official=args.impl == "official", seed=args.seed,
    )
    for field in ("iterations", "teachers", "teacher_epochs", "net_width", "student_epochs", "checkpoints"):
        if getattr(config, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')} must be >= 1, got {getattr(config, field)}")
    if config.checkpoints > config.student_epochs:
        raise ValueError(f"--checkpoints ({config.checkpoints}) cannot exceed --student-epochs ({config.student_epochs})")
    if config.mid_gap < 0 or config.teacher_images < 0:
        raise ValueError("--mid-gap and --teacher-images must be >= 0")
    if not 1 <= config.batch_syn <= n:
        raise ValueError(f"--batch-syn must be in [1, {n}] (classes × IPC), got {config.batch_syn}")
    if config.alpha < 0 or config.eps < 0 or config.lr_img <= 0 or config.lr_net <= 0:
        raise ValueError("--alpha and --apm-eps must be >= 0, --lr-img and --lr-net > 0")
    return config


# ----------------------------------------------------------------------------- networks


def _network(dataset: data.Dataset, width: int) -> nn.Module:
    return models.create(MODEL, dataset.channels, dataset.num_classes, dataset.image_size, width=width)


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def teacher_config(epochs: int) -> TrainConfig:
    """The official teacher recipe (model_train/train.py): SGD 0.05, momentum 0.9, wd 5e-4, batch 256,
    DSA, ×0.1 at the half (MultiStepLR at 50 of the script's 100 epochs), E passes, the final epoch kept."""
    return TrainConfig(epochs=epochs, batch_size=256, lr=0.05, schedule="multistep", milestone=epochs // 2,
                       extra_pass=False, augment="dsa")


def get_teacher(dataset: data.Dataset, width: int, epochs: int, seed: int, train_images: int = 0) -> tuple[nn.Module, float]:
    """Train (or load from the cache) one APM teacher; resumable per epoch like ``ddfast.train``."""
    subset = random_subset(len(dataset.train_images), train_images)
    path = teacher_path(dataset.name, MODEL, width, epochs, seed, 0 if subset is None else len(subset), recipe="apm")
    seed_everything(seed)
    model = _network(dataset, width)
    acc = cached_fit(path, model, dataset, subset, teacher_config(epochs), seed, desc=f"apm teacher {seed + 1} (convnet w{width})")
    return _frozen(model), acc


def student_lr(config: Config, epoch: int) -> float:
    """The official student schedule: MultiStepLR at E//2+1 (×0.1 from that epoch index on)."""
    return config.lr_net * (0.1 if epoch >= config.student_epochs // 2 + 1 else 1.0)


class Student:
    """The student network, reused by every retrain cycle (re-initialised in place), so its
    ``torch.compile``d loss (``compile=True``: inductor fuses instance norm, ReLU and pooling with their
    backward; 1.5-1.7x a training step on CPU) is compiled once per run, not once per cycle."""

    def __init__(self, dataset: data.Dataset, width: int, compile: bool) -> None:
        self.dataset, self.width = dataset, width
        self.net = _network(dataset, width)
        self.loss = torch.compile(self._loss, dynamic=False) if compile else self._loss

    def _loss(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.net(x), v)

    def reinit(self) -> nn.Module:
        """Fresh random weights from the global RNG (what a new ``_network`` would get)."""
        self.net.load_state_dict(_network(self.dataset, self.width).state_dict())
        return self.net


def train_student(student: Student, images: torch.Tensor, targets: torch.Tensor, config: Config, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Train the (re-initialised) student E epochs on (images, teacher logits) with L1 and DSA; returns
    the K checkpoints (parameter dicts). Whole-batch tensors, no DataLoader, no host syncs."""
    net = student.net
    optimizer = torch.optim.SGD(list(net.parameters()), lr=config.lr_net, momentum=0.9, weight_decay=5e-4, foreach=True)
    keep = set(config.checkpoint_epochs)
    n = images.shape[0]
    checkpoints = []
    net.train()
    for epoch in range(config.student_epochs):
        for group in optimizer.param_groups:
            group["lr"] = student_lr(config, epoch)
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_train):
            idx = order[start : start + config.batch_train]
            loss = student.loss(augment.dsa(images[idx], generator=gen), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch + 1 in keep:
            checkpoints.append({k: v.detach().clone() for k, v in net.named_parameters()})
    return checkpoints


def train_student_reference(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, config: Config, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """The same training written as the official ``train``/``epoch`` (distill.py:36-76, utils.py:380-430):
    a DataLoader per retrain, an lr scheduler, per-batch loss.item() and numpy accuracy, deep copies."""
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr_net, momentum=0.9, weight_decay=0.0005)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [config.student_epochs // 2 + 1], gamma=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=config.batch_train,
                                         shuffle=True, num_workers=0, generator=gen)
    keep = set(config.checkpoint_epochs)
    middle_models = []
    for ep in range(config.student_epochs):
        net.train()
        loss_avg, acc_avg, num_exp = 0.0, 0, 0
        for img, lab in loader:
            img = augment.dsa(img.float(), generator=gen)
            output = net(img)
            loss = F.l1_loss(output, lab)
            acc = np.sum(np.equal(np.argmax(output.cpu().data.numpy(), axis=-1), np.argmax(lab.cpu().data.numpy(), axis=-1)))
            loss_avg += loss.item() * lab.shape[0]
            acc_avg += acc
            num_exp += lab.shape[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if ep + 1 in keep:
            middle_models.append(copy.deepcopy(net).cpu())
        schedule.step()
    return [dict(m.named_parameters()) for m in middle_models]


# ----------------------------------------------------------------------------- image update


class MatchingNets:
    """The teacher and the K student checkpoints of the image update, frozen, as one function
    x [n, ...] -> z [K+1, n, C] (z[0] the teacher, z[1:] the checkpoints: K4's input).

    Persistent module slots receive each cycle's weights in place (:meth:`load`), so a
    ``torch.compile``d forward (``compile=True``) is traced once per run and per segment size.
    Checkpoints: ``vmap`` runs them as one ``torch.func.vmap`` of ``functional_call`` over parameters
    stacked with ``stack_module_state`` (batched kernels: the GPU path); ``loop`` runs the K frozen
    modules one after the other. On CPU the vmapped convolutions (grouped convolutions over K) are
    1.2-1.8x slower than K plain ones (perf/test_apm.py), so ``auto`` picks vmap on CUDA, the loop on CPU."""

    def __init__(self, base: nn.Module, k: int, mode: str = "auto", compile: bool = False) -> None:
        if mode not in CHECKPOINT_EVAL:
            raise ValueError(f"checkpoint evaluation must be one of {CHECKPOINT_EVAL}, got {mode!r}")
        device = next(base.parameters()).device
        self.mode = mode if mode != "auto" else ("vmap" if device.type == "cuda" else "loop")
        self.teacher = _frozen(copy.deepcopy(base))
        self.students = [_frozen(copy.deepcopy(base)) for _ in range(k)]
        self._base = _frozen(copy.deepcopy(base))

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self._base, (p, b), (x,))

        self._vmapped = torch.func.vmap(one, in_dims=(0, 0, None))
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self._forward = torch.compile(self._logits, dynamic=False) if compile else self._logits

    @torch.no_grad()
    def load(self, teacher: nn.Module, states: list[dict[str, torch.Tensor]]) -> MatchingNets:
        if len(states) != len(self.students):
            raise ValueError(f"expected {len(self.students)} checkpoints, got {len(states)}")
        self.teacher.load_state_dict(teacher.state_dict())
        for module, state in zip(self.students, states):
            module.load_state_dict(state, strict=False)
        if self.mode == "vmap":
            params, self.buffers = torch.func.stack_module_state(self.students)
            self.params = {k: v.detach() for k, v in params.items()}
        return self

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "vmap":
            students = self._vmapped(self.params, self.buffers, x)
        else:
            students = torch.stack([m(x) for m in self.students])
        return torch.cat([self.teacher(x).unsqueeze(0), students])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


def image_gradient(u: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, nets: MatchingNets, config: Config) -> tuple[torch.Tensor, float]:
    """∇_u L_u over the batch ``idx`` in segments of ``config.segment`` images (exact: every
    network is a per-sample function in eval mode, each segment weighted by 1/B with the global B)."""
    grad = torch.zeros_like(u)
    batch = idx.numel()
    step = config.segment or batch
    total = u.new_zeros((), dtype=torch.float64)
    for start in range(0, batch, step):
        seg = idx[start : start + step]
        x = u.detach()[seg].requires_grad_(True)
        z = nets(x)
        loss = apm_loss(z, y[seg], batch_size=batch, alpha=config.alpha, log=config.distance == "log", eps=config.eps)
        loss.backward()
        grad.index_add_(0, seg, x.grad)
        total += loss.detach().double()
    return grad, float(total)


def image_gradient_reference(u: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, teacher: nn.Module, middle_models: list[nn.Module], config: Config) -> tuple[torch.Tensor, float]:
    """distill.py:327-368 statement by statement: for every checkpoint and chunk the teacher is
    re-forwarded and −(|c|/B)·l1_loss backpropagated into the images (parameters keep requires_grad),
    then (|c|/B)·α·CE per chunk; the gradient is accumulated on the host tensor."""
    image_syn = u.detach().clone().requires_grad_(True)
    batch_syn = idx.numel()
    chunks = list(torch.split(idx, config.segment or batch_syn))
    loss_all = 0.0
    accumulated_grad = torch.zeros_like(image_syn)
    for n in range(len(middle_models)):
        cur_net = middle_models[n]
        cur_net.eval()
        for chunk in chunks:
            img = image_syn[chunk]
            t_logits = teacher(img)
            s_logits = cur_net(img)
            if config.distance == "log":  # the paper's per-sample −log(L1 + ε), summed and weighted 1/B
                loss_l1 = -(1.0 / batch_syn) * torch.log((s_logits - t_logits).abs().sum(1) + config.eps).sum()
            else:
                loss_l1 = -(len(t_logits) / batch_syn) * F.l1_loss(s_logits, t_logits)
            loss_all += loss_l1.item()
            loss_l1.backward(retain_graph=False)
            accumulated_grad += image_syn.grad.detach()
            image_syn.grad.zero_()
    ce_criterion = nn.CrossEntropyLoss()
    for chunk in chunks:
        img = image_syn[chunk]
        lab = y[chunk]
        t_logits = teacher(img)
        loss_tce = (len(t_logits) / batch_syn) * config.alpha * ce_criterion(t_logits, lab)
        loss_all += loss_tce.item()
        loss_tce.backward(retain_graph=False)
        accumulated_grad += image_syn.grad.detach()
        image_syn.grad.zero_()
    return accumulated_grad, loss_all


# ----------------------------------------------------------------------------- the loop


def _init_images(dataset: data.Dataset, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    idx = class_balanced_subset(dataset.train_labels, dataset.num_classes, config.ipc, config.seed)
    return dataset.normalize(dataset.train_images[idx]).clone(), dataset.train_labels[idx].clone()


def _cycle_rng(config: Config, cycle: int) -> torch.Generator:
    """Everything random in retrain cycle ``cycle`` (teacher draw, subset, student init, DSA) comes
    from here, so a resumed run retraces the same cycles."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + cycle)


def build_teachers(dataset: data.Dataset, config: Config, world: distributed.World = distributed.SINGLE) -> tuple[list[nn.Module], list[float]]:
    """The teacher pool; under torchrun each teacher (cached training) is a unit of its own."""
    built = distributed.build_everywhere(
        world, config.teachers, lambda t: get_teacher(dataset, config.net_width, config.teacher_epochs, t, config.teacher_images))
    return [model for model, _ in built], [acc for _, acc in built]


def start_cycle(student: Student, u: torch.Tensor, pool: list[nn.Module], config: Config, cycle: int) -> dict[str, Any]:
    """Draw the teacher and the subset of this cycle, label the subset with the teacher on clean
    images and train the student; returns the cycle state (what a resumed run reloads)."""
    gen = _cycle_rng(config, cycle)
    teacher_index = int(torch.randint(len(pool), (1,), generator=gen))
    n = u.shape[0]
    idx = torch.randperm(n, generator=gen)[: config.batch_syn].sort().values if config.batch_syn < n else torch.arange(n)
    images = u.detach()[idx].clone()
    with torch.no_grad():
        targets = pool[teacher_index](images)
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    net = student.reinit()
    states = train_student_reference(net, images, targets, config, gen) if config.official else train_student(student, images, targets, config, gen)
    return {"cycle": cycle, "teacher": teacher_index, "idx": idx, "checkpoints": [{k: v.detach() for k, v in s.items()} for s in states]}


def distill(args: argparse.Namespace, dataset: data.Dataset) -> DistillResult | None:
    """The distilled set. Under torchrun the teachers are dealt to the ranks; the rounds then run on rank 0 alone
    (each round needs the images the previous one left, and the other ranks return None)."""
    config = resolve_config(args, dataset.num_classes)
    world = getattr(args, "world", distributed.SINGLE)
    if world.is_main:
        print(_describe(config, args.preset))
    out = Path(args.out_dir)
    timing = {"teacher_training": 0.0, "student_training": 0.0, "image_update": 0.0, "labelling": 0.0}
    start = time.time()
    pool, teacher_accs = build_teachers(dataset, config, world)
    timing["teacher_training"] = time.time() - start
    if not world.is_main:
        return None
    print("teachers' test accuracy: " + ", ".join(f"{a:.2f}" for a in teacher_accs))
    u, y = _init_images(dataset, config)
    optimizer = torch.optim.SGD([u.requires_grad_(True)], lr=config.lr_img, momentum=config.img_momentum)
    loop = Loop(out / "checkpoint" / "apm.pt", dataclasses.asdict(config), config.iterations, f"apm IPC {config.ipc}", unit="round")
    saved = loop.resume()
    cycle_state = None
    if saved is not None:
        with torch.no_grad():
            u.copy_(saved["images"])
        optimizer.load_state_dict(saved["optimizer"])
        cycle_state = saved["cycle_state"]
        timing.update({k: saved["timing"][k] for k in ("student_training", "image_update")})
    base = _network(dataset, config.net_width)
    student = Student(dataset, config.net_width, compile=config.compile and not config.official)
    nets = None if config.official else MatchingNets(base, len(config.checkpoint_epochs), config.checkpoint_eval, config.compile)
    loaded, middle_models, peak_mb = None, None, None

    def step(it: int) -> dict[str, str]:
        nonlocal cycle_state, loaded, middle_models, peak_mb
        t0 = time.time()
        cycle = it // (config.mid_gap + 1)
        if cycle_state is None or cycle_state["cycle"] != cycle:
            cycle_state = start_cycle(student, u, pool, config, cycle)
        t1 = time.time()
        if loaded != cycle_state["cycle"]:
            loaded = cycle_state["cycle"]
            if config.official:
                middle_models = []
                for state in cycle_state["checkpoints"]:
                    m = copy.deepcopy(base)
                    m.load_state_dict(state, strict=False)
                    middle_models.append(m)
            else:
                nets.load(pool[cycle_state["teacher"]], cycle_state["checkpoints"])
        teacher = pool[cycle_state["teacher"]]
        for group in optimizer.param_groups:  # MultiStepLR([R//2], gamma=0.3) stepped once per round
            group["lr"] = config.lr_img * (0.3 if it >= config.iterations // 2 else 1.0)
        idx = cycle_state["idx"]
        # measured on the second round of this process (the first one traces/compiles), or the only one
        measure = peak_mb is None and (it > loop.first or it == config.iterations - 1)
        with PeakMemory() if measure else contextlib.nullcontext(None) as peak:
            if config.official:
                for p in teacher.parameters():  # the official teacher is not frozen
                    p.requires_grad_(True)
                grad, loss = image_gradient_reference(u, idx, y, teacher, middle_models, config)
                _frozen(teacher)
            else:
                grad, loss = image_gradient(u, idx, y, nets, config)
        if peak is not None:
            peak_mb = peak.mb
        u.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timing["student_training"] += t1 - t0
        timing["image_update"] += time.time() - t1
        return {"loss": f"{loss:.4f}", "lr": f"{optimizer.param_groups[0]['lr']:.3g}"}

    compiling = config.compile and not config.official
    loop.run(step, lambda: {"images": u.detach(), "optimizer": optimizer.state_dict(), "cycle_state": cycle_state, "timing": timing},
             first_note="compiling the student loss and the matching networks (torch.compile: ~50 s on a fresh machine, "
             "cached after)" if compiling else None)
    t3 = time.time()
    images = u.detach().clone()
    final_teacher = pool[cycle_state["teacher"]] if cycle_state is not None else pool[0]
    real, real_labels = _init_images(dataset, config)
    with torch.no_grad():
        soft = final_teacher(images)
        soft_real = final_teacher(real)
    timing["labelling"] = time.time() - t3
    stats: dict[str, Any] = {
        "seconds_per_iteration": loop.seconds_per_iteration,
        "time_split_seconds": timing,
        "recover_peak_mem_mb": peak_mb,
        "image_update_peak_mem_mb": peak_mb,
        "teacher_test_accs": teacher_accs,
        "label_teacher": cycle_state["teacher"] if cycle_state is not None else 0,
        "method_config": dataclasses.asdict(config),
    }
    baseline = DistillResult(images=real, labels=real_labels, soft_labels=soft_real, label_mode="l1")
    return DistillResult(images=images, labels=y, soft_labels=soft, stats=stats, baseline=baseline, label_mode="l1")


def _describe(config: Config, preset: str) -> str:
    subset = f"{config.teacher_images} images" if config.teacher_images else "all images"
    return (
        f"apm ({preset} preset): {config.teachers} teacher(s) ConvNet-D3 w{config.net_width}, {config.teacher_epochs} epoch(s) on {subset}; "
        f"{config.iterations} rounds, B = {config.batch_syn}, student every {config.mid_gap + 1} round(s): E = {config.student_epochs}, "
        f"K = {config.checkpoints} (after epochs {config.checkpoint_epochs}), lr_net {config.lr_net:g}; α = {config.alpha:g}, "
        f"φ = {'−log(L1+ε)' if config.distance == 'log' else '−L1/C'}, lr_img {config.lr_img:g} (momentum 0.5, ×0.3 at R/2); "
        f"segment {config.segment or 'off'}, {'official-style (--impl official)' if config.official else 'fused'} path"
    )
