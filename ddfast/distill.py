"""Distil a dataset: ``python -m ddfast.distill --method random --ipc 10``.

Writes OUT/distilled.pt (images, labels, soft labels, metadata; see ``ddfast.io``), OUT/grid.png
(one row per class) and OUT/report.json (timings, peak memory and, unless --no-eval, the
evaluation result), and prints an accuracy table.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import pkgutil
import resource
import sys
import time
from pathlib import Path
from typing import Any

from ddfast import __version__, backend, data, distributed, io, judge
from ddfast.evaluate import DEFAULT_EPOCHS, add_protocol_arguments, evaluate_synset, format_table, protocol_kwargs
from ddfast.selection import INITS
from ddfast.utils import atomic_write_text, seed_everything



def discover_methods() -> dict[str, str]:
    """--method name -> module, for every module of ``ddfast.methods`` with a ``distill`` function and a ``NAME`` (or
    ``NAMES``, for a module that serves several methods): a new method is a new file, nothing to register."""
    import ddfast.methods  # noqa: PLC0415

    found = {}
    for info in sorted(pkgutil.iter_modules(ddfast.methods.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"ddfast.methods.{info.name}")
        if callable(getattr(module, "distill", None)):
            for name in getattr(module, "NAMES", (getattr(module, "NAME", None),)):
                if name:
                    found[name] = module.__name__
    return found


METHODS = discover_methods()

GENERATIVE = ("d2m", "dim", "dcgm")  # methods whose set comes from a generator: judged (ddfast.judge)
IMPLS = ("ddfast", "official")
OFFICIAL_IMPL = ("gvbsm", "sre2l", "apm")  # methods with an official-style pipeline (--impl official)
DISTRIBUTED = ("gvbsm", "sre2l", "apm", "datadam")  # methods that deal their work units to the ranks of a torchrun launch


def _method(name: str) -> Any:
    return importlib.import_module(METHODS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddfast.distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(METHODS), help="distillation method")
    parser.add_argument("--dataset", default="fashion-mnist", help=f"dataset to distil (default fashion-mnist); one of {', '.join(data.available())}")
    parser.add_argument("--data-dir", default=None, help="dataset location (default: $DDFAST_DATA_DIR or the dataset's standard path)")
    parser.add_argument("--holdout", type=int, default=0,
                        help="hold out this many training images (fixed draw) and test on them instead of the test split: "
                        "for choosing hyper-parameters without the test set (default 0 = off)")
    parser.add_argument("--ipc", type=int, default=10, help="images per class in the distilled set (default 10)")
    parser.add_argument("--out", default=None, help="output directory (default runs/<method>-<dataset>-ipc<N>-s<seed>)")
    parser.add_argument("--seed", type=int, default=0, help="seed for everything random (default 0)")
    parser.add_argument(
        "--segment", type=int, default=0,
        help="at most this many synthetic images go through a network at once; never changes the result, "
        "only memory and time (0 = whole batch). gvbsm, sre2l, apm, datadam (instance norm), d2m (its pool network); "
        "dim and dcgm refuse it (train-mode batch norm in the generator, L_intra and L_inter couple the generated images)",
    )
    parser.add_argument("--backend", choices=backend.BACKENDS, default=None,
                        help="force a kernel backend (default: by device); only swaps the kernels, never the pipeline")
    parser.add_argument("--impl", choices=IMPLS, default="ddfast",
                        help="gvbsm, sre2l, apm: ddfast (default: fused ops, compiled losses, no per-step host syncs) or official "
                        "(the official code's pipeline statement by statement: its hooks, loops and unfused ops; for equality "
                        "checks and as the benchmark baseline)")
    parser.add_argument("--dist-backend", choices=distributed.BACKENDS, default=None,
                        help=f"under torchrun ({', '.join(DISTRIBUTED)}): the torch.distributed backend (default: nccl with CUDA, "
                        "else gloo)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after distilling")
    parser.add_argument(
        "--no-baseline", action="store_true",
        help="do not evaluate the random real subset labelled by the same teachers (methods with soft labels "
        "evaluate it under the same protocol by default and save it as OUT/random-baseline.pt; d2m: the pretrained "
        "generator sampled with the same latents, OUT/pretrained-generator-baseline.pt)",
    )
    parser.add_argument(
        "--no-judge", action="store_true",
        help=f"generative methods ({', '.join(GENERATIVE)}): skip the judge's class consistency and within-class diversity of "
        "the set and of the pretrained generator's sample (ddfast.judge; report.json \"judge\", \"baseline_judge\")",
    )
    evaluation = parser.add_argument_group("evaluation (see python -m ddfast.evaluate --help)")
    add_protocol_arguments(evaluation, prefix="eval-")
    shared = parser.add_argument_group("options shared by several methods (their meaning per method)")
    shared.add_argument("--preset", choices=("default", "paper"), default="default",
                        help="default: sized for 2 CPU cores (gvbsm/sre2l: widths 4-32, teachers 1 epoch on 20000 images, recover "
                        "refines 200 iterations at jitter 4 from teacher-selected real images, ~7 min for IPC 10 with teacher "
                        "training; apm: see docs/methods/apm.md); paper: the paper's pool, widths, schedules (gvbsm/sre2l: "
                        "4000 iterations from noise, jitter 32) and evaluation (hours to days on a CPU)")
    shared.add_argument("--init", choices=INITS, default=None,
                        help="initial images. gvbsm/sre2l: noise (randn, the official code), real (the class-balanced random real "
                        "subset of --seed: the random baseline's own images), selected (real images the teacher pool picks from "
                        "--candidates per class, see --select-rule) (default from --preset); datadam: real (default) or noise")
    shared.add_argument("--iterations", type=int, default=None,
                        help="gvbsm/sre2l: recover iterations per batch; apm: rounds R of image updates (default from --preset)")
    shared.add_argument("--teacher-epochs", type=int, default=None, help="epochs to train each teacher/backbone (default from --preset; cached)")
    shared.add_argument("--teacher-images", type=int, default=None,
                        help="train each teacher/backbone on a fixed random subset of this many training images, 0 = all "
                        "(default from --preset: 20000 for default, all for paper)")
    shared.add_argument("--alpha", type=float, default=None,
                        help="gvbsm/sre2l: EMA factor of the SDS matching (gvbsm 0.8, sre2l 0); apm: weight α of the teacher CE term (0.1)")
    shared.add_argument("--net-width", type=int, default=None,
                        help="apm: width of the teacher and student ConvNet-D3; datadam/d2m: width of the matching ConvNets "
                        "(default from --preset: 128 paper)")
    shared.add_argument("--lr-img", type=float, default=None,
                        help="apm: SGD learning rate γ on the images (momentum 0.5, ×0.3 at R/2; default from --preset: paper 1 "
                        "(official), default 0.01·B, i.e. a per-image step γ/B = 0.01 whatever the IPC, since the 1/B weighting of "
                        "L_u makes γ scale with B); datadam: SGD learning rate on the pixels (momentum 0.5; default 1, the official code)")
    # The evaluation follows --preset unless given: the paper preset evaluates as the paper reports.
    parser.set_defaults(eval_epochs=None, recipe=None)
    for module in dict.fromkeys(METHODS.values()):  # gvbsm and sre2l share one module and its options
        names = "/".join(n for n, m in METHODS.items() if m == module)
        importlib.import_module(module).add_arguments(parser.add_argument_group(f"--method {names}"))
    return parser


# What --preset paper evaluates with when --eval-epochs / --recipe are not given: G-VBSM and SRe2L
# report the relabel recipe with E = 1000 (CIFAR rows), APM 1000 evaluation epochs.
PAPER_EVAL = {"gvbsm": ("fkd", 1000), "sre2l": ("fkd", 1000), "apm": ("static", 1000)}
DEFAULT_EVAL = ("static", DEFAULT_EPOCHS)


def resolve_evaluation(args: argparse.Namespace) -> None:
    """Fill --recipe and --eval-epochs from the preset where the user left them out."""
    recipe, epochs = PAPER_EVAL.get(args.method, DEFAULT_EVAL) if args.preset == "paper" else DEFAULT_EVAL
    if args.recipe is None:
        args.recipe = recipe
    if args.eval_epochs is None:
        args.eval_epochs = epochs


@functools.lru_cache(maxsize=1)
def _method_options() -> dict[str, tuple[Any, set[str]]]:
    """dest -> (default, methods that use it) for every option of a method's own group (``--method X`` in --help)."""
    owners: dict[str, tuple[Any, set[str]]] = {}
    for module in dict.fromkeys(METHODS.values()):
        group = argparse.ArgumentParser(add_help=False).add_argument_group()
        importlib.import_module(module).add_arguments(group)
        users = {n for n, m in METHODS.items() if m == module}
        for action in group._group_actions:
            owners[action.dest] = (action.default, set(users))
    for name, module in METHODS.items():
        for dest in getattr(importlib.import_module(module), "OTHER_OPTIONS", ()):
            owners[dest][1].add(name)
    return owners


def reject_foreign_options(args: argparse.Namespace) -> None:
    """An option of another method's group given to this method is an error, not silently ignored."""
    for dest, (default, users) in _method_options().items():
        if args.method not in users and getattr(args, dest, default) != default:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} is an option of --method {'/'.join(sorted(users))}; --method {args.method} does not use it")


def validate(args: argparse.Namespace) -> None:
    """Reject bad arguments before any work starts."""
    reject_foreign_options(args)
    resolve_evaluation(args)
    if args.holdout < 0:
        raise ValueError(f"--holdout must be >= 0 (0 = off), got {args.holdout}")
    if args.ipc < 1:
        raise ValueError(f"--ipc must be >= 1, got {args.ipc}")
    if args.impl == "official" and args.method not in OFFICIAL_IMPL:
        raise ValueError(f"--impl official exists for {', '.join(OFFICIAL_IMPL)}; {args.method} has one implementation")
    if args.segment < 0:
        raise ValueError(f"--segment must be >= 0 (0 = whole batch), got {args.segment}")
    if not args.no_eval:
        if args.eval_epochs < 1 or args.eval_runs < 1:
            raise ValueError("--eval-epochs and --eval-runs must be >= 1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Distill (and evaluate); the report. Under torchrun the ranks share the work and rank 0 writes and evaluates
    (the other ranks return an empty report)."""
    validate(args)
    if distributed.launched() and args.method not in DISTRIBUTED:
        raise ValueError(f"--method {args.method} runs in one process; launch it without torchrun "
                         f"(distributed: {', '.join(DISTRIBUTED)})")
    args.world = distributed.init(args.dist_backend)
    dataset = data.load(args.dataset, args.data_dir, holdout_images=args.holdout)
    out = Path(args.out or f"runs/{args.method}-{dataset.name}-ipc{args.ipc}-s{args.seed}")
    args.out_dir = str(out)
    seed_everything(args.seed)
    start = time.time()
    with backend.use_backend(args.backend):
        result = _method(args.method).distill(args, dataset)
    # no rank tears its process group down while another is still inside a collective (gloo aborts the process
    # whose peer closed the connection mid-operation); after this only rank 0 works, alone
    distributed.barrier(args.world)
    if result is None:  # a rank other than 0: its share is with rank 0
        return {}
    seconds = time.time() - start
    config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    meta = {
        "method": args.method, "dataset": dataset.name, "ipc": args.ipc, "seed": args.seed,
        "config": config, "ddfast_version": __version__, "class_names": list(dataset.class_names),
        "normalization": {"mean": list(dataset.mean), "std": list(dataset.std)},
    }
    if result.teachers:
        meta["teachers"] = result.teachers
    if result.label_mode:
        meta["label_mode"] = result.label_mode
    io.save(out / "distilled.pt", result.images, result.labels, result.soft_labels, meta)
    io.save_grid(out / "grid.png", result.images, result.labels, dataset.mean, dataset.std, dataset.num_classes)
    if result.baseline is not None:
        base_file = result.baseline_name.replace(" ", "-") + "-baseline.pt"
        io.save(out / base_file, result.baseline.images, result.baseline.labels, result.baseline.soft_labels,
                {**meta, "method": result.baseline_name, "labelled_by": args.method})
    stats = dict(result.stats)
    recover_peak = stats.pop("recover_peak_mem_mb", None)
    report: dict[str, Any] = {
        "method": args.method, "dataset": dataset.name, "ipc": args.ipc, "seed": args.seed, "config": config,
        "seconds_distill": seconds,
        "seconds_per_iteration": stats.pop("seconds_per_iteration", None),
        # Peak extra resident memory of the recover stage (what --segment bounds) where the method
        # has one; otherwise the process's peak RSS.
        "peak_mem_mb": recover_peak,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **stats,
    }
    if report["peak_mem_mb"] is None:
        report["peak_mem_mb"] = report["process_peak_rss_mb"]
    if args.method in GENERATIVE and not args.no_judge:
        pair = judge.get_judge(dataset)
        for key, part, name in (("judge", result, args.method), ("baseline_judge", result.baseline, result.baseline_name)):
            if part is not None:
                report[key] = judge.judge_set(dataset, part.images, part.labels, judge=pair)
                print(f"judge, {name}: {judge.describe(report[key])}")
    if not args.no_eval:
        protocol = protocol_kwargs(args, "eval-", result.label_mode or ("soft" if result.soft_labels is not None else "hard"))
        fkd = protocol["recipe"] == "fkd" and protocol["label_mode"] == "soft"
        # Relabel and logit-L1 protocols also report the same images under hard labels (the DC rows).
        with_hard = fkd or protocol["label_mode"] == "l1"
        evaluation = evaluate_synset(result.images, result.labels, dataset, soft_labels=result.soft_labels, seed=args.seed,
                                     teachers=result.teachers, **protocol)
        report.update(evaluation)
        rows = [{"method": args.method, "ipc": args.ipc, **evaluation,
                 "seconds_per_iteration": report["seconds_per_iteration"], "peak_mem_mb": report["peak_mem_mb"]}]
        hard_protocol = {**protocol, "label_mode": "hard", "lr": None, "batch_size": None, "schedule": None}
        if with_hard:  # the hard-label DC accuracy of the same images beside the soft-label number
            report["hard_labels"] = evaluate_synset(result.images, result.labels, dataset, seed=args.seed, **hard_protocol)
            rows.append({"method": args.method, "ipc": args.ipc, **report["hard_labels"]})
        if result.baseline is not None and not args.no_baseline:
            base = result.baseline
            report["baseline"] = evaluate_synset(base.images, base.labels, dataset, soft_labels=base.soft_labels, seed=args.seed,
                                                 teachers=base.teachers, random_subsets=fkd, **protocol)
            name = "random (same teachers)" if result.baseline_name == "random" and base.soft_labels is not None else result.baseline_name
            rows.append({"method": name, "ipc": args.ipc, **report["baseline"]})
            if with_hard and not fkd:  # fkd's baseline draws fresh subsets; the DC row of one subset adds little there
                report["baseline_hard_labels"] = evaluate_synset(base.images, base.labels, dataset, seed=args.seed, **hard_protocol)
                rows.append({"method": "random", "ipc": args.ipc, **report["baseline_hard_labels"]})
        print(format_table(rows))
        print("accuracies: " + ", ".join(f"{a:.2f}" for a in evaluation["accs"]))
    atomic_write_text(json.dumps(report, indent=2), out / "report.json")
    print(f"wrote {out}/distilled.pt, {out}/grid.png, {out}/report.json")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        rank = f" (rank {args.world.rank})" if getattr(args, "world", distributed.SINGLE).distributed else ""
        print(f"error{rank}: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(getattr(args, "world", distributed.SINGLE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
