"""Sample a distilled set from a stored generator: ``python -m ddfast.generate GEN --ipc N --seed S --out DIR``.

Writes DIR/distilled.pt (exactly N images per class with hard labels, in the dataset's normalisation;
``python -m ddfast.evaluate DIR/distilled.pt`` trains on it) and DIR/grid.png. The same (GEN, N, S)
always gives the same images: z is drawn from S, class-major, and the generator runs in eval mode.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddfast import data, generators, io, judge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generator", help="a generator file written by ddfast (e.g. OUT/generator.pt of --method d2m)")
    parser.add_argument("--ipc", type=int, required=True, help="images per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--data-dir", default=None, help="the generator's dataset, for the judge (default: $DDFAST_DATA_DIR or the standard path)")
    parser.add_argument("--no-judge", action="store_true",
                        help="skip the judge's class consistency and within-class diversity (ddfast.judge; the judge is trained "
                        "once per dataset and cached)")
    args = parser.parse_args(argv)
    try:
        if args.ipc < 1:
            raise ValueError(f"--ipc must be >= 1, got {args.ipc}")
        generator, meta = generators.load(args.generator)
        norm = meta.get("normalization")
        if not norm:
            raise ValueError(f"{args.generator} has no dataset normalisation in its metadata")
        images, labels = generators.sample(generator, generator.num_classes, args.ipc, args.seed, norm["mean"], norm["std"])
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    file_meta = {"method": f"generator ({meta.get('stage', 'unknown')})", "dataset": meta.get("dataset"), "ipc": args.ipc,
                 "seed": args.seed, "generator": str(Path(args.generator).resolve()), "normalization": norm,
                 "class_names": meta.get("class_names", [])}
    io.save(out / "distilled.pt", images, labels, None, file_meta)
    io.save_grid(out / "grid.png", images, labels, norm["mean"], norm["std"], generator.num_classes)
    print(f"wrote {out}/distilled.pt ({len(labels)} images, {args.ipc} per class) and {out}/grid.png")
    if not args.no_judge:
        try:
            dataset = data.load(meta.get("dataset") or "", args.data_dir)
        except (ValueError, FileNotFoundError) as err:  # the set is written; only the judge cannot run
            print(f"judge skipped: {err} (pass --data-dir, or --no-judge)", file=sys.stderr)
            return 0
        print(f"judge: {judge.describe(judge.judge_set(dataset, images, labels))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
