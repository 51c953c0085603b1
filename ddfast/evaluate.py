"""Evaluation protocol: train fresh models on a distilled set, report test accuracy mean ± std.

``python -m ddfast.evaluate runs/x/distilled.pt --runs 3`` follows the DC protocol by default
(ConvNet-D3, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 256, lr ×0.1 after epoch E/2+1, E = 300)
with DSA augmentation; ``--labels soft`` (``--recipe static``) trains on the stored teacher logits
with MSE + γ·CE (γ = 0.15, G-VBSM) or, with ``--soft-loss kl``, KL at a temperature.
``--labels l1`` is APM's protocol: L1 to the stored logits, SGD lr 0.02, torch's MultiStepLR (×0.1 from
epoch E/2+1 on, momentum kept), E+1 passes, DSA.
``--recipe fkd`` is the relabel recipe of the G-VBSM/SRe2L papers (``ddfast.fkd``): the teacher
pool the file names relabels every augmented, cut-mixed batch; AdamW 1e-3, cosine, batch 100.
``--random-subsets`` evaluates a fresh class-balanced random real subset of the file's IPC per run
instead of the file's images (the baseline under the same recipe and teachers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from ddfast import data, distributed, fkd, generators, io, models, on_the_fly
from ddfast.selection import class_balanced_subset
from ddfast.train import TrainConfig, accuracy, fit, load_teacher_pool
from ddfast.utils import atomic_write_text, seed_everything

LABEL_MODES = ("hard", "soft", "l1")
RECIPES = ("static", "fkd")
# Recipe defaults of the options whose meaning is shared: (learning rate, batch size)
RECIPE_DEFAULTS = {"static": (0.01, 256), "fkd": (1e-3, 100), "l1": (0.02, 256)}
SOFT_LOSSES = ("mse_ce", "kl")

DEFAULT_EPOCHS = 300  # the DC protocol's training epochs per run


def evaluate_synset(
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: data.Dataset,
    soft_labels: torch.Tensor | None = None,
    model: str = "convnet",
    width: int | None = None,
    epochs: int = 300,
    runs: int = 3,
    dsa: bool = True,
    label_mode: str = "hard",
    soft_loss: str = "mse_ce",
    gamma: float = 0.15,
    temperature: float = 4.0,
    lr: float | None = None,
    schedule: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    first_run: int = 0,
    recipe: str = "static",
    teachers: list[dict[str, Any]] | None = None,
    label_cache: str | None = None,
    random_subsets: bool = False,
) -> dict[str, Any]:
    """Train ``runs`` fresh models on (normalised) ``images`` and test each on the dataset's test
    split. Run r (r = first_run, ..., first_run + runs - 1) is seeded with seed·1000 + r, so runs
    split over several processes give the same accuracies as one process. Returns ``{"mean", "std", "accs", "protocol", "seconds"}``; accuracies in percent, std
    is the population std over runs (np.std, as the DC code reports it).

    ``label_mode="hard"`` is always the DC protocol; soft labels follow ``recipe``: "static" (the
    stored logits under the DC protocol) or "fkd" (``ddfast.fkd``, relabelled online by the pool
    ``teachers`` names). ``random_subsets`` (fkd) replaces the images by a fresh class-balanced random
    real subset of the same IPC per run."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    defaults = RECIPE_DEFAULTS["l1" if label_mode == "l1" else recipe if label_mode == "soft" else "static"]
    schedule = schedule or ("multistep" if label_mode == "l1" else "step")
    lr = defaults[0] if lr is None else lr
    batch_size = defaults[1] if batch_size is None else batch_size
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"soft loss must be one of {SOFT_LOSSES}, got {soft_loss!r}")
    if random_subsets and not (recipe == "fkd" and label_mode == "soft"):
        raise ValueError("--random-subsets is the fkd recipe's baseline: use it with --recipe fkd (soft labels)")
    if recipe == "fkd" and label_mode == "soft":
        if not teachers:
            raise ValueError("the fkd recipe relabels with the teacher pool that distilled the set, and this file names none")
        if epochs < 1 or batch_size < 1 or runs < 1 or first_run < 0:
            raise ValueError("epochs, batch size and runs must be >= 1 and the first run >= 0")
        pool, key = load_teacher_pool(dataset, teachers)
        source: Any = images.float()
        if random_subsets:
            ipc = images.shape[0] // dataset.num_classes

            def subset_of_run(run_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
                idx = class_balanced_subset(dataset.train_labels, dataset.num_classes, ipc, run_seed)
                return dataset.normalize(dataset.train_images[idx]), dataset.train_labels[idx].clone()

            source = subset_of_run

        config = fkd.FKDConfig(epochs=epochs, batch_size=batch_size, lr=lr, gamma=gamma)
        return fkd.evaluate_fkd(source, labels, dataset, pool, key, config, model=model, width=width, runs=runs,
                                seed=seed, first_run=first_run, label_cache=label_cache)
    if label_mode in ("soft", "l1") and soft_labels is None:
        raise ValueError(f"--labels {label_mode} needs a distilled set with soft labels (this one has none)")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if first_run < 0:
        raise ValueError(f"first run must be >= 0, got {first_run}")
    if tuple(images.shape[1:]) != (dataset.channels, *dataset.image_size):
        raise ValueError(
            f"distilled images are {tuple(images.shape[1:])} but {dataset.name} images are "
            f"{(dataset.channels, *dataset.image_size)}"
        )
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule=schedule,
        augment="dsa" if dsa else "none",
        loss={"hard": "ce", "l1": "l1"}.get(label_mode, soft_loss),
        gamma=gamma,
        temperature=temperature,
    )
    test_images = dataset.normalize(dataset.test_images)
    images = images.float()
    soft = soft_labels.float() if (soft_labels is not None and label_mode != "hard") else None
    accs, start = [], time.time()
    for run in range(first_run, first_run + runs):
        run_seed = seed * 1000 + run
        seed_everything(run_seed)
        net = models.create(model, dataset.channels, dataset.num_classes, dataset.image_size, width=width)
        fit(net, images, labels, config, soft_labels=soft, generator=torch.Generator().manual_seed(run_seed), desc=f"eval run {run + 1 - first_run}/{runs}")
        accs.append(accuracy(net, test_images, dataset.test_labels))
    protocol = {
        "recipe": {"soft": "static", "l1": "apm-l1"}.get(label_mode, "dc"),
        "model": model,
        "width": width,
        "epochs": epochs,
        "passes": config.passes,
        "runs": runs,
        "dsa": dsa,
        "labels": label_mode,
        "soft_loss": soft_loss if label_mode == "soft" else None,
        "gamma": gamma if label_mode == "soft" and soft_loss == "mse_ce" else None,
        "temperature": temperature if label_mode == "soft" and soft_loss == "kl" else None,
        "lr": lr,
        "schedule": schedule,
        "batch_size": batch_size,
        "optimizer": "sgd(momentum=0.9, weight_decay=5e-4)",
        "seed": seed,
        "first_run": first_run,
        "dataset": dataset.name,
        "num_images": int(images.shape[0]),
    }
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs, "protocol": protocol, "seconds": time.time() - start}


def protocol_summary(protocol: dict[str, Any]) -> str:
    if protocol.get("recipe") == "fkd":
        subsets = ", fresh random subset per run" if protocol.get("random_subset_per_run") else ""
        return f"{protocol['model']}, {protocol['epochs']} ep, fkd relabel (RRC+flip+CutMix, MSE+{protocol['gamma']:g}CE){subsets}, {protocol['runs']} runs"
    labels = {"hard": "hard", "l1": "logits/L1"}.get(protocol["labels"]) or f"soft/{protocol['soft_loss']}"
    return f"{protocol['model']}, {protocol['epochs']} ep, {'DSA' if protocol['dsa'] else 'no aug'}, {labels} labels, {protocol['runs']} runs"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows with ``method``, ``ipc`` and an evaluation result -> an aligned text table. Rows may
    carry ``seconds_per_iteration`` and ``peak_mem_mb`` (the distillation's cost), shown when any does."""
    header = ("method", "IPC", "protocol", "accuracy (%)")
    body = [
        (str(r["method"]), str(r["ipc"]), protocol_summary(r["protocol"]), f"{r['mean']:.2f} ± {r['std']:.2f}")
        for r in rows
    ]
    for key, title, fmt in (("seconds_per_iteration", "s/iteration", "{:.3f}"), ("peak_mem_mb", "peak mem (MB)", "{:.0f}")):
        if any(r.get(key) is not None for r in rows):
            header = (*header, title)
            body = [(*row, "-" if r.get(key) is None else fmt.format(r[key])) for row, r in zip(body, rows)]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, body)])


def add_protocol_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The evaluation options, shared by this CLI and ``ddfast.distill`` (there with ``eval-``)."""
    p = f"--{prefix}"
    parser.add_argument(f"{p}model", default="convnet", help=f"evaluation model (default convnet = ConvNet-D3); one of {', '.join(models.available())}")
    parser.add_argument(f"{p}width", type=int, default=None, help="evaluation model width (default: the model's standard width)")
    parser.add_argument(f"{p}epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs per run (default {DEFAULT_EPOCHS}; in ddfast.distill --preset paper: 1000 for gvbsm/sre2l/apm, as the papers)")
    parser.add_argument(f"{p}runs", type=int, default=3, help="fresh models trained and tested (default 3)")
    parser.add_argument(f"{p}lr", type=float, default=None, help="learning rate (default: 0.01 SGD for hard/static, 0.02 SGD for l1, 1e-3 AdamW for fkd)")
    parser.add_argument(f"{p}schedule", choices=("step", "multistep", "cosine"), default=None,
                        help="step: ×0.1 after epoch E/2+1 with a fresh optimiser as in the DC code (default; multistep for --labels l1, "
                        "torch's MultiStepLR as the APM code); cosine")
    parser.add_argument(f"{p}batch-size", type=int, default=None, help="training batch size (default: 256 for hard/static, 100 for fkd)")
    parser.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True, help="DSA augmentation while training (default on)")
    parser.add_argument("--labels", choices=LABEL_MODES, default=None,
                        help="hard: CE on labels (DC protocol); soft: teacher labels by --recipe; l1: L1 to the stored teacher logits "
                        "(APM's protocol) (default: the file's own mode (l1 for apm), soft when the file has soft labels, else hard)")
    parser.add_argument("--recipe", choices=RECIPES, default="static",
                        help="soft-label recipe: static = the stored logits under the DC protocol (default); fkd = the G-VBSM/SRe2L "
                        "relabel recipe (teacher pool on every RandomResizedCrop+flip+CutMix batch, MSE + γ·CE, AdamW, cosine); "
                        "ddfast.distill --preset paper uses fkd for gvbsm/sre2l")
    parser.add_argument("--label-cache", default=None, help="fkd: store the augmentation draws and teacher logits of a seed here and reuse them")
    parser.add_argument("--soft-loss", choices=SOFT_LOSSES, default="mse_ce", help="soft-label loss: mse_ce = MSE(logits, soft) + γ·CE (G-VBSM, default) or kl")
    parser.add_argument("--gamma", type=float, default=0.15, help="γ of the mse_ce loss (0.15 CIFAR/small datasets, 0.1 ImageNet)")
    parser.add_argument("--temperature", type=float, default=4.0, help="temperature of the kl soft-label loss (default 4)")


def protocol_kwargs(args: argparse.Namespace, prefix: str, default_labels: str) -> dict[str, Any]:
    """The evaluation keyword arguments from parsed options; ``default_labels`` is the label mode used
    when --labels is not given (the file's own: "l1" for APM, "soft" with soft labels, else "hard")."""
    get = lambda name: getattr(args, prefix.replace("-", "_") + name)  # noqa: E731
    return {
        "model": get("model"),
        "width": get("width"),
        "epochs": get("epochs"),
        "runs": get("runs"),
        "lr": get("lr"),
        "schedule": get("schedule"),
        "batch_size": get("batch_size"),
        "dsa": args.dsa,
        "label_mode": args.labels or default_labels,
        "soft_loss": args.soft_loss,
        "gamma": args.gamma,
        "temperature": args.temperature,
        "recipe": args.recipe,
        "label_cache": args.label_cache,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="a distilled set written by ddfast (distilled.pt); with --on-the-fly a generator (generator.pt)")
    parser.add_argument("--dataset", default=None, help="test dataset (default: the one recorded in the file)")
    parser.add_argument("--data-dir", default=None, help="dataset location (default: $DDFAST_DATA_DIR or the dataset's standard path)")
    add_protocol_arguments(parser)
    parser.add_argument("--holdout", type=int, default=0,
                        help="test on this many held-out training images instead of the test split (a file distilled with "
                        "--holdout records it in its dataset name; default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for model init, batches and augmentation (default 0)")
    parser.add_argument("--first-run", type=int, default=0, help="index of the first run (seeded seed*1000 + index), to split runs over processes (default 0)")
    parser.add_argument("--random-subsets", action="store_true",
                        help="fkd: evaluate a fresh class-balanced random real subset of the file's IPC per run instead of its images")
    parser.add_argument("--on-the-fly", action="store_true",
                        help="FILE is a generator: DiM's protocol (ddfast.on_the_fly): every step trains on freshly generated images, "
                        "--ipc images per class per epoch, --epochs (default 1000, the code's) of SGD 0.01; reports the final-epoch "
                        "accuracy and, in brackets, the code's max over 5 test points")
    parser.add_argument("--ipc", type=int, default=None, help="--on-the-fly: images per class per epoch (the code's INPC)")
    parser.add_argument("--json", default=None, help="write the result as JSON here")
    parser.add_argument("--dist-backend", choices=distributed.BACKENDS, default=None,
                        help="under torchrun the runs are dealt to the ranks (same seeds, same accuracies as one process): the "
                        "torch.distributed backend (default: nccl with CUDA, else gloo)")
    parser.set_defaults(epochs=None)  # 300 for a set; on-the-fly: the DiM code's 1000
    args = parser.parse_args(argv)
    if args.on_the_fly:
        return _main_on_the_fly(args)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    world = distributed.init(args.dist_backend)
    try:
        synset = io.load(args.file)
        meta = synset["meta"]
        dataset = data.load(args.dataset or meta.get("dataset", "fashion-mnist"), args.data_dir, holdout_images=args.holdout)
        if args.runs < 1:
            raise ValueError(f"--runs must be >= 1, got {args.runs}")

        def evaluate_runs(first: int, runs: int) -> dict[str, Any]:
            return evaluate_synset(
                synset["images"], synset["labels"], dataset, soft_labels=synset["soft_labels"], seed=args.seed, first_run=first,
                teachers=meta.get("teachers"), random_subsets=args.random_subsets,
                **{**protocol_kwargs(args, "", meta.get("label_mode") or (
                    "soft" if synset["soft_labels"] is not None or (args.recipe == "fkd" and bool(meta.get("teachers"))) else "hard")),
                   "runs": runs},
            )

        if world.distributed:  # run r on rank r mod N, seeded as in one process (seed·1000 + r)
            start = time.time()
            mine = {u: evaluate_runs(args.first_run + u, 1) for u in distributed.my_units(world, args.runs)}
            parts = distributed.gather_units(world, mine, args.runs)
            distributed.barrier(world)  # as in ddfast.distill: no rank leaves while another is in a collective
            if parts is None:
                return 0
            result = {**combine_runs(parts), "seconds": time.time() - start}
        else:
            result = evaluate_runs(args.first_run, args.runs)
    except (ValueError, FileNotFoundError) as err:
        print(f"error{f' (rank {world.rank})' if world.distributed else ''}: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(world)
    row = {"method": meta.get("method", "?"), "ipc": meta.get("ipc", "?"), **result}
    print(format_table([row]))
    print("accuracies: " + ", ".join(f"{a:.2f}" for a in result["accs"]) + f"  ({result['seconds']:.0f} s)")
    if args.json:
        atomic_write_text(json.dumps(result, indent=2), args.json)
        print(f"wrote {args.json}")
    return 0


def combine_runs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from single-run results in run order (what one process evaluating all the runs returns; seconds
    summed)."""
    accs = [acc for part in parts for acc in part["accs"]]
    protocol = {**parts[0]["protocol"], "runs": len(accs)}
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs, "protocol": protocol,
            "seconds": sum(part["seconds"] for part in parts)}


def _main_on_the_fly(args: argparse.Namespace) -> int:
    try:
        if args.ipc is None or args.ipc < 1:
            raise ValueError(f"--on-the-fly needs --ipc >= 1, got {args.ipc}")
        epochs = on_the_fly.PAPER_EPOCHS if args.epochs is None else args.epochs
        if epochs < 1 or args.runs < 1:
            raise ValueError("--epochs and --runs must be >= 1")
        generator, meta = generators.load(args.file)
        dataset = data.load(args.dataset or meta.get("dataset", "fashion-mnist"), args.data_dir, holdout_images=args.holdout)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = on_the_fly.evaluate_on_the_fly(generator, dataset, args.ipc, epochs, runs=args.runs, seed=args.seed, model=args.model)
    print(f"{args.file}: {result['protocol']}, {args.runs} run(s): final {result['mean']:.2f} ± {result['std']:.2f} "
          f"[max of 5 test points {result['max_of_5_mean']:.2f} ± {result['max_of_5_std']:.2f}]  ({result['seconds']:.0f} s)")
    if args.json:
        atomic_write_text(json.dumps(result, indent=2), args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
