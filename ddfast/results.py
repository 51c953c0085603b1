"""Results tables from committed result files: ``python -m ddfast.results [--check]``.

Every file under ``results/<group>/*.json`` is one measured cell: the evaluation JSON that ``python -m ddfast.evaluate
--json`` wrote (accuracies of every run and the full protocol) and the commands that produced it, tagged with the
table, split, row, IPC and column it fills. This module renders each table and writes it into ``docs/results.md``
between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; ``--check`` fails (exit 1) when the page differs
from what the files give, so a number on the page always has its artefact and its command.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = {"fkd": "fkd (E 300)", "random": "random subset, same recipe and teachers", "hard": "hard labels (DC)"}


def load(root: Path = ROOT) -> list[dict[str, Any]]:
    cells = []
    for path in sorted((root / "results").glob("*/*.json")):
        cell = json.loads(path.read_text())
        if "speed_rows" in cell:
            required: tuple[str, ...] = ("table", "speed_rows")
        elif "report" in cell:
            required = ("table", "row", "ipc", "commands", "report")
        elif "perf_csv" in cell:
            required = ("table", "perf_csv", "command")
            cell["perf_rows"] = list(csv.DictReader((root / cell["perf_csv"]).open()))
        else:
            required = ("table", "split", "row", "ipc", "column", "commands", "result")
        for key in required:  # a timing table (render_speed), perf rows (render_perf) or an evaluation cell
            if key not in cell:
                raise ValueError(f"{path} has no {key!r}")
        cell["file"] = str(path.relative_to(root))
        cells.append(cell)
    return cells


def _cell(result: dict[str, Any]) -> str:
    runs = len(result["accs"])
    text = f"{result['mean']:.2f} ± {result['std']:.2f}" if runs > 1 else f"{result['mean']:.2f}"
    return text + ("" if runs == 3 else f" ({runs} run{'s' if runs > 1 else ''})")


SPEED_CONFIGS = {"1x1": "1 process × 1 thread", "1x2": "1 process × 2 threads", "2x1": "torchrun 2 × 1 thread"}


def render_speed(cell: dict[str, Any]) -> str:
    """A timing table: per stage the wall seconds of each launch configuration, and the speed-up and parallel
    efficiency of 2 processes over 1 process × 1 thread."""
    head = ["stage", "work units", *SPEED_CONFIGS.values(), "speed-up 2 × 1 vs 1 × 1", "efficiency"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in cell["speed_rows"]:
        wall = row["wall_s"]
        speedup = wall["1x1"] / wall["2x1"]
        lines.append("| " + " | ".join([row["stage"], row["units"], *(f"{wall[c]:.1f} s" for c in SPEED_CONFIGS),
                                         f"×{speedup:.2f}", f"{speedup / 2:.0%}"]) + " |")
    return "\n".join(lines)


def render_perf(cell: dict[str, Any]) -> str:
    """Kernel timings from committed ``pytest perf/`` rows: per (kernel, mode, shape) the median ms of ddfast, the
    official-style code and torch.compile of it, and ddfast's speed-up over each."""
    times: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for row in cell["perf_rows"]:
        if row["metric"] == "time":
            times[(row["kernel"], row["mode"], row["shape"])][row["provider"]] = float(row["p50"])
    head = ["kernel", "mode", "shape", "ddfast ms", "official ms", "torch.compile ms", "× official", "× compile"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, mode, shape), t in times.items():
        d, o, c = t.get("ddfast"), t.get("official"), t.get("torch_compile")
        ms = lambda v: f"{v:.2f}" if v is not None else "—"  # noqa: E731
        ratio = lambda v: f"{v / d:.1f}" if v is not None and d else "—"  # noqa: E731
        lines.append("| " + " | ".join([kernel, mode, shape, ms(d), ms(o), ms(c), ratio(o), ratio(c)]) + " |")
    return "\n".join(lines) + f"\n\n`{cell['command']}`"


def render_reports(cells: list[dict[str, Any]]) -> str:
    """Generative runs from their ``distill`` report.json: per row the DC accuracy of the stored set, the judge's class
    consistency and within-class diversity (the real data's beside it), the generator's pretraining budget and the
    seconds of each stage; by budget, then IPC."""
    head = ["set", "IPC", "accuracy (DC, hard labels)", "judge: consistency", "judge: diversity (real)",
            "pretraining iterations", "seconds: pretraining / condensation / evaluation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in sorted(cells, key=lambda c: (c["report"]["method_config"]["gan_iterations"], c["ipc"])):
        rep = cell["report"]
        judge, split = rep.get("judge") or {}, rep.get("time_split_seconds", {})
        stages = [split.get("pretraining", split.get("stage1_gan")), split.get("condensation", split.get("stage2_matching")),
                  rep.get("seconds")]
        lines.append("| " + " | ".join([
            cell["row"], str(cell["ipc"]), _cell(rep) if "accs" in rep else "not run",
            f"{judge['consistency']:.1f}%" if judge else "—",
            f"{judge['diversity']:.3f} ({judge['real_diversity']:.3f})" if judge.get("diversity") is not None else "—",
            str(rep["method_config"]["gan_iterations"]),
            " / ".join("—" if v is None else f"{v:.0f}" for v in stages)]) + " |")
    return "\n".join(lines)


def render_curve(cells: list[dict[str, Any]]) -> str:
    """The judge's curves over the generators' pretraining: one column pair per run, leaving out a run whose curve
    is the start of another's (the same training, stopped earlier) or equal to an earlier one's (one generator, two IPCs)."""
    curves = [(c, c["report"]["pretraining_judge_curve"]) for c in cells]
    kept = [(c, curve) for i, (c, curve) in enumerate(curves)
            if not any(other[:len(curve)] == curve and (len(other) > len(curve) or j < i) for j, (_, other) in enumerate(curves))]
    iterations = sorted({p["iteration"] for _, curve in kept for p in curve})
    head = ["pretraining iteration"] + [f"{c['row']}: {what}" for c, _ in kept for what in ("consistency", "diversity")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for it in iterations:
        line = [str(it)]
        for _, curve in kept:
            point = next((p for p in curve if p["iteration"] == it), None)
            line += [f"{point['consistency']:.1f}%", f"{point['diversity']:.3f}"] if point else ["", ""]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n\n(from " + ", ".join(f"`{c['file']}`" for c, _ in kept) + ")"


def render(table: str, cells: list[dict[str, Any]]) -> str:
    """A markdown table: one line per (row, IPC) in file order, the columns the cells fill; for a table with a
    ``random`` column the difference to the random subset of the same IPC and split."""
    base, _, view = table.partition(".")  # NAME.curve: the pretraining curve of table NAME's runs
    mine = [c for c in cells if c["table"] == base]
    if not mine:
        raise ValueError(f"no result files for table {base!r}")
    if view == "curve":
        return render_curve(mine)
    if view:
        raise ValueError(f"unknown view {view!r} of table {base!r} (known: curve)")
    if "report" in mine[0]:
        return render_reports(mine)
    if "speed_rows" in mine[0]:
        return render_speed(mine[0])
    if "perf_csv" in mine[0]:
        return render_perf(mine[0])
    columns = [c for c in COLUMNS if any(cell["column"] == c for cell in mine)]
    random = {(c["split"], c["ipc"]): c["result"] for c in mine if c["column"] == "random"}
    rows: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for c in mine:
        if c["column"] != "random":
            rows[(c["split"], c["row"], c["ipc"])][c["column"]] = c["result"]
    head = ["set", "split", "IPC", *(COLUMNS[c] for c in columns)]
    with_delta = "random" in columns and "fkd" in columns
    if with_delta:
        head.insert(head.index(COLUMNS["random"]) + 1, "Δ")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (split, row, ipc), found in sorted(rows.items(), key=lambda kv: (kv[0][2], list(rows).index(kv[0]))):
        line = [row, split, str(ipc)]
        for col in columns:
            res = random.get((split, ipc)) if col == "random" else found.get(col)
            line.append(_cell(res) if res else "not run")
            if col == "random" and with_delta:
                fkd = found.get("fkd")
                line.append(f"{fkd['mean'] - res['mean']:+.2f}" if fkd and res else "")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def update(page: str, cells: list[dict[str, Any]]) -> str:
    """``page`` with every marked table re-rendered from ``cells``."""
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"<!-- results:{name} -->\n{render(name, cells)}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:([\w.-]+) -->.*?<!-- /results:\1 -->", fill, page, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md differs from the result files")
    parser.add_argument("--page", default=str(ROOT / "docs" / "results.md"))
    args = parser.parse_args(argv)
    page = Path(args.page)
    text = page.read_text()
    new = update(text, load())
    if args.check:
        if new != text:
            print(f"{page} is not what the result files give: run python -m ddfast.results", file=sys.stderr)
            return 1
        return 0
    page.write_text(new)
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
