"""``pytest perf/``: benchmarks put ddfast next to the official-style eager code and torch.compile
in one run. Tables print with -s; rows are appended to perf/results/latest.csv."""
import os

os.environ.setdefault("DDFAST_NO_PROGRESS", "1")
