"""Stage-2 pooling at ImageNet shape: the Beam pipeline against plain in-memory numpy.

    python -m benchmarks.pooling_scale [--models 19 --images 50000 --classes 1000]

SYNTHETIC data: the logits are random (a standard normal per entry, half shared by
all models and half the model's own, plus a model-dependent boost on one "true"
class per image), written as one uncompressed
predictions NPZ per model (19 x 50,000 x 1,000 float32 = 3.8 GB) in a temporary
folder. Both implementations read the same files and compute the same exact top-N
(N = 3 x images) per model and criterion, then pool and write proposals.parquet:

- reference: in-memory numpy, one model at a time: its whole logits matrix,
  ``auditing.proposals.select_model_proposals`` on it, then ``pool_proposals``;
- pipeline: ``pipelines.propose.propose`` (Beam DirectRunner, 1 worker), streaming
  row shards out of the NPZ files.

Each runs in its own subprocess (so peak RSS is its own: ``ru_maxrss``), after the
files have been read once so that both find them in the page cache. Prints both
wall times, their ratio (target <= 1.2) and both peak RSS (target < 4 GB for the
pipeline), and checks that the two proposals.parquet are identical.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RATIO_TARGET = 1.2
RSS_TARGET_GB = 4.0


def write_synthetic_predictions(folder: Path, models: int, images: int, classes: int,
                                seed: int = 0) -> tuple[list[Path], Path]:
    """One predictions NPZ per model and an original-labels TSV; all synthetic."""
    rng = np.random.default_rng(seed)
    file_names = np.array([f"ILSVRC2012_val_{k + 1:08d}.JPEG" for k in range(images)])
    true_class = rng.integers(classes, size=images)
    original = np.where(rng.random(images) < 0.9, true_class, rng.integers(classes, size=images))
    labels = folder / "original_labels.tsv"
    pd.DataFrame({"file_name": file_names, "label": original}).to_csv(labels, sep="\t", index=False)
    shared = rng.standard_normal((images, classes), dtype=np.float32)  # what all models see alike
    paths = []
    for m in range(models):
        model_rng = np.random.default_rng([seed, m])
        logits = model_rng.standard_normal((images, classes), dtype=np.float32)
        logits += shared
        logits *= np.float32(np.sqrt(0.5))
        logits[np.arange(images), true_class] += np.float32(2.0 + 4.0 * m / max(models - 1, 1))
        path = folder / f"model{m:02d}.npz"
        np.savez(path, file_names=file_names, logits=logits)
        paths.append(path)
        del logits
    return paths, labels


def run_reference(paths: list[Path], labels: Path, out: Path) -> None:
    """The plain in-memory implementation (one model's full matrix at a time)."""
    from auditing import labelsets
    from auditing import proposals as P
    from pipelines.propose import write_proposals

    selections, file_names = [], None
    for path in paths:
        with np.load(path, allow_pickle=False) as npz:
            names, logits = npz["file_names"], npz["logits"]
        order = np.argsort(names)
        file_names = names[order]
        selections.append(P.select_model_proposals(path.stem, logits[order],
                                                   P.default_top_n(len(names))))
        del logits
    original = labelsets.read_label_tsv(labels).set_index("file_name").loc[file_names, "label"]
    write_proposals(P.pool_proposals(selections, original.to_numpy(), file_names),
                    out / "proposals.parquet")


def run_pipeline(paths: list[Path], labels: Path, out: Path) -> None:
    from pipelines.beam_options import make_options
    from pipelines.propose import propose

    propose([str(p) for p in paths], labels, out, options=make_options("direct", 1))


def phase_main(args: argparse.Namespace) -> int:
    """In a subprocess: run one implementation and print its wall time and peak RSS as JSON."""
    paths = sorted(Path(args.data).glob("model*.npz"))
    labels = Path(args.data) / "original_labels.tsv"
    import apache_beam  # noqa: F401  (imports outside the timed part for both phases)
    import auditing.proposals  # noqa: F401
    start = time.perf_counter()
    (run_reference if args.phase == "reference" else run_pipeline)(paths, labels, Path(args.out))
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": wall, "peak_rss_gb": peak_kb / 2**20}))
    return 0


def run_phase(phase: str, data: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "benchmarks.pooling_scale", "--phase", phase,
                             "--data", str(data), "--out", str(out)],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def warm_page_cache(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=19)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each phase; the best is kept")
    parser.add_argument("--phase", choices=["reference", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return phase_main(args)

    with tempfile.TemporaryDirectory(prefix="pooling-scale-") as tmp:
        data, tmp = Path(tmp) / "data", Path(tmp)
        data.mkdir()
        print(f"SYNTHETIC logits: {args.models} models x {args.images:,} images x {args.classes:,} "
              f"classes (float32, {args.models * args.images * args.classes * 4 / 1e9:.1f} GB of NPZ), "
              f"N = 3 x images = {3 * args.images:,} per model and criterion", flush=True)
        t = time.perf_counter()
        write_synthetic_predictions(data, args.models, args.images, args.classes)
        print(f"  written in {time.perf_counter() - t:.0f} s", flush=True)
        warm_page_cache(data)
        results = {"reference": [], "pipeline": []}
        for repeat in range(args.repeats):
            for phase in results:  # alternate, so neither always runs on a warmer machine
                results[phase].append(run_phase(phase, data, tmp / phase))
                print(f"  {phase}: {results[phase][-1]['wall_s']:.1f} s, peak RSS "
                      f"{results[phase][-1]['peak_rss_gb']:.2f} GB", flush=True)
        best = {phase: min(runs, key=lambda r: r["wall_s"]) for phase, runs in results.items()}
        reference = pd.read_parquet(tmp / "reference" / "proposals.parquet")
        pipeline = pd.read_parquet(tmp / "pipeline" / "proposals.parquet")
        identical = reference.drop(columns="sources").equals(pipeline.drop(columns="sources")) and all(
            list(a) == list(b) for a, b in zip(reference["sources"], pipeline["sources"]))
    ratio = best["pipeline"]["wall_s"] / best["reference"]["wall_s"]
    per_image = len(pipeline) / args.images
    print(f"in-memory numpy (reference): {best['reference']['wall_s']:.1f} s wall, "
          f"peak RSS {best['reference']['peak_rss_gb']:.2f} GB")
    print(f"Beam pipeline (DirectRunner, 1 worker): {best['pipeline']['wall_s']:.1f} s wall, "
          f"peak RSS {best['pipeline']['peak_rss_gb']:.2f} GB (target < {RSS_TARGET_GB:.0f} GB)")
    print(f"ratio pipeline / reference: {ratio:.2f}x (target <= {RATIO_TARGET}x)")
    print(f"proposals: {len(pipeline):,} ({per_image:.2f} per image); identical outputs: {identical}")
    ok = identical and ratio <= RATIO_TARGET and best["pipeline"]["peak_rss_gb"] < RSS_TARGET_GB
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
