"""Wall time and peak memory of the vote half of the pipeline on all ReaL votes.

    python -m benchmarks.votes_to_labels [--method gold-confusion]

read raters.npz (+ the golden questions) -> validate -> aggregate (with
configs/imagenet_real.yaml's method and parameters)
-> label sets -> TFDS release (Beam, in-process) for the 50,000 validation images
(924,810 votes). Target: < 60 s on 2 cores. Reference in the same run: crowd-kit's
stock MajorityVote on the same votes (the cheapest aggregation there is) with the same
release write, as a ratio. Each measurement runs in a fresh process so that peak RSS
is its own.
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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _config_aggregate() -> dict:
    """The aggregate section of the default config (what `make demo` runs)."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "imagenet_real.yaml").read_text())
    return config["stages"]["aggregate"]


def _measure(kind: str, method: str) -> dict[str, float]:
    from auditing import aggregation, labelsets, votes
    from pipelines import release
    from pipelines.beam_options import make_options

    timings = {}
    start = time.perf_counter()
    raw = votes.read_real_raters_raw()
    timings["read"] = time.perf_counter() - start
    t = time.perf_counter()
    kept = votes.validate_votes(raw).kept
    del raw
    timings["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    originals = labelsets.original_val_labels()
    if kind == "pipeline":
        from auditing import gold as gold_lib, sources

        section = _config_aggregate()
        params = section.get("params", {}) if method == section["method"] else {}
        golden = gold_lib.read_real_gold(sources.fetch("real_golden"), sources.fetch("real_raters_golden"),
                                         known_raters=set(kept["rater_id"].astype(str)))
        scores = aggregation.aggregate(kept, method=method, original_labels=originals, gold=golden,
                                       **params).scores_
    else:
        from crowdkit.aggregation import MajorityVote

        crowd = aggregation.CrowdData.from_votes(kept)
        probas = MajorityVote().fit_predict_proba(crowd.binary())
        scores = crowd.questions.assign(score=aggregation.present_scores(probas, len(crowd.questions)))
    timings["aggregate"] = time.perf_counter() - t
    t = time.perf_counter()
    sets = aggregation.label_sets(scores, originals, threshold=0.8)
    timings["label_sets"] = time.perf_counter() - t
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        table = release.release_table(originals["file_name"].tolist(), originals["label"].to_numpy(),
                                      sets, scores)
        release.write_release(out, "benchmark_audit", "1.0.0", table, release_notes={"1.0.0": "benchmark"},
                              manifest={}, counts={}, options=make_options("direct"))
    timings["release"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    timings["peak_rss_mib"] = _peak_rss_mib()
    timings["labels"] = sets.counts["labels"]
    timings["empty_sets"] = sets.counts["empty_sets"]
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default=_config_aggregate()["method"])
    parser.add_argument("--child", choices=["pipeline", "majority"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child, args.method)))
        return 0
    results = {}
    for kind in ("majority", "pipeline"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.votes_to_labels", "--child", kind,
                              "--method", args.method], check=True, capture_output=True, text=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'run':34s} {'read':>6s} {'valid.':>6s} {'aggr.':>6s} {'sets':>5s} {'release':>7s} {'total':>7s} "
          f"{'peak RSS':>9s}")
    for kind, name in (("majority", "crowd-kit MajorityVote (reference)"), ("pipeline", args.method)):
        r = results[kind]
        print(f"{name:34s} {r['read']:6.1f} {r['validate']:6.1f} {r['aggregate']:6.1f} {r['label_sets']:5.1f} "
              f"{r['release']:7.1f} {r['total']:6.1f}s {r['peak_rss_mib']:7.0f}MiB   {r['labels']:,} labels, "
              f"{r['empty_sets']:,} empty sets")
    ratio = results["pipeline"]["total"] / results["majority"]["total"]
    target = "OK" if results["pipeline"]["total"] < 60 else "OVER"
    print(f"{args.method}: votes -> release {results['pipeline']['total']:.1f} s end to end = x{ratio:.2f} the majority-vote "
          f"run; target < 60 s: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
