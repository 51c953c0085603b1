"""ddfast.results: the results page equals what the committed result files give; rendering on known cells."""
import json

import pytest

from ddfast import results


def test_the_results_page_is_generated_from_the_committed_files():
    assert results.main(["--check"]) == 0


def _cell(row, ipc, column, accs, split="test"):
    mean = sum(accs) / len(accs)
    std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
    return {"table": "t", "split": split, "row": row, "ipc": ipc, "column": column, "commands": [],
            "result": {"accs": accs, "mean": mean, "std": std}}


def test_render_pairs_each_row_with_the_random_subset_of_its_ipc():
    cells = [_cell("a", 10, "fkd", [76.0, 77.0, 78.0]), _cell("random", 10, "random", [75.0, 75.0, 75.0]),
             _cell("a", 50, "fkd", [80.0]), _cell("a", 10, "hard", [70.0, 70.0, 70.0])]
    table = results.render("t", cells).splitlines()
    assert table[0] == "| set | split | IPC | fkd (E 300) | random subset, same recipe and teachers | Δ | hard labels (DC) |"
    assert table[2] == "| a | test | 10 | 77.00 ± 0.82 | 75.00 ± 0.00 | +2.00 | 70.00 ± 0.00 |"
    assert table[3] == "| a | test | 50 | 80.00 (1 run) | not run |  | not run |"
    page = "x\n<!-- results:t -->\nold\n<!-- /results:t -->\ny"
    assert results.update(page, cells) == "x\n<!-- results:t -->\n" + "\n".join(table) + "\n<!-- /results:t -->\ny"


def test_a_result_file_without_its_tags_is_refused(tmp_path):
    (tmp_path / "results" / "g").mkdir(parents=True)
    (tmp_path / "results" / "g" / "x.json").write_text(json.dumps({"table": "t"}))
    with pytest.raises(ValueError, match="has no 'split'"):
        results.load(tmp_path)


def test_speed_table_gives_speedup_and_efficiency_over_one_thread():
    cell = {"table": "t", "speed_rows": [{"stage": "recover", "units": "5 batches",
                                          "wall_s": {"1x1": 100.0, "1x2": 60.0, "2x1": 50.0}}]}
    text = results.render("t", [cell])
    assert "| recover | 5 batches | 100.0 s | 60.0 s | 50.0 s | ×2.00 | 100% |" in text


def test_perf_table_gives_each_kernel_row_its_ratios():
    rows = [{"kernel": "k1", "mode": "fwd", "shape": "[2,3]", "metric": "time", "provider": p, "p50": v}
            for p, v in (("ddfast", "2.0"), ("official", "10.0"), ("torch_compile", "4.0"))]
    rows.append({"kernel": "k1", "mode": "fwd", "shape": "[2,3]", "metric": "peak_mem", "provider": "ddfast", "p50": "99"})
    text = results.render("k", [{"table": "k", "perf_rows": rows, "perf_csv": "x.csv", "command": "pytest perf/"}])
    assert "| k1 | fwd | [2,3] | 2.00 | 10.00 | 4.00 | 5.0 | 2.0 |" in text and "pytest perf/" in text


def test_generative_reports_give_accuracy_judge_budget_and_the_longest_curve():
    def report(iterations, curve):
        return {"mean": 70.0, "std": 0.5, "accs": [69.5, 70.0, 70.5], "seconds": 30.0,
                "judge": {"consistency": 76.0, "diversity": 0.6819, "real_diversity": 0.6827},
                "time_split_seconds": {"pretraining": 100.0, "condensation": 20.4}, "method_config": {"gan_iterations": iterations},
                "pretraining_judge_curve": [{"iteration": i, "consistency": c, "diversity": d} for i, c, d in curve]}
    cells = [{"table": "g", "row": "dcgm", "ipc": 10, "commands": [], "file": f"results/g/{n}.json", "report": report(n, curve)}
             for n, curve in ((1000, [(0, 10.0, 0.001), (1000, 83.0, 0.46)]), (2000, [(0, 10.0, 0.001), (1000, 83.0, 0.46), (2000, 88.0, 0.5)]))]
    text = results.render("g", cells)
    assert "| dcgm | 10 | 70.00 ± 0.50 | 76.0% | 0.682 (0.683) | 1000 | 100 / 20 / 30 |" in text
    curve = results.render("g.curve", cells)  # the 1000-iteration curve is the start of the 2000-iteration one
    assert "| 2000 | 88.0% | 0.500 |" in curve and "results/g/2000.json" in curve and "1000.json" not in curve
    other = {**cells[0], "row": "other", "file": "results/g/o.json",
             "report": report(1000, [(0, 10.0, 0.001), (1000, 50.0, 0.7)])}
    both = results.render("g.curve", [*cells, other, {**other, "file": "results/g/o2.json"}])  # o2: o's generator at another IPC
    assert "| 1000 | 83.0% | 0.460 | 50.0% | 0.700 |" in both and "| 2000 | 88.0% | 0.500 |  |  |" in both and "o2.json" not in both
    with pytest.raises(ValueError, match="unknown view"):
        results.render("g.other", cells)
