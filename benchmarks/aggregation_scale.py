"""Dawid-Skene at ImageNet-train scale: the Beam path against the in-memory crowd-kit path.

    python -m benchmarks.aggregation_scale [--votes 1000000 5000000 24000000]
        [--crowdkit-max-votes 5000000] [--work DIR]

Votes are SYNTHETIC, drawn to look like the ReaL ones: questions per image and votes
per question from their empirical distributions in raters.npz, raters in proportion
to their share of the ReaL votes (distinct raters per question), each question's
truth from the ReaL class prior, and each answer from that rater's confusion matrix
as measured by Dawid-Skene on the 924,810 ReaL votes. They are written as Parquet
files of <= 2M votes (file_name, label, rater_id, answer), the format at that scale.

Per size, each path runs in its own subprocess (peak RSS = its ``ru_maxrss``):
- beam: ``pipelines.beam_aggregation.aggregate_sharded`` on the Parquet files,
  DirectRunner in-process (one process: on 2 shared cores a second worker process
  buys nothing, and the peak RSS is then one number);
- crowdkit: the in-memory stage: read the files, ``votes.validate_votes``,
  ``aggregation.aggregate`` (PresenceDawidSkene) — up to ``--crowdkit-max-votes``
  (it needs ~0.5 GB per million votes: at 24M about 12 GB, more than a shared
  machine should be asked for).
Both run method dawid-skene with default params (global prior, smoothing 1, n_iter
100, tol 1e-5). Targets: 24M votes under 8 GB peak RSS on the Beam path; Beam no
slower than 1.5x crowd-kit at 1M. The last line is JSON for the largest size:
{"votes", "method", "beam_s", "beam_peak_gb", "crowdkit_s", "crowdkit_peak_gb", "ratio"}
(ratio = beam_s / crowdkit_s, null where crowd-kit was not run).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

FILE_VOTES = 2_000_000
METHOD = "dawid-skene"


def real_vote_model() -> dict:
    """What the synthetic votes are drawn from, measured on the ReaL votes."""
    from auditing import aggregation
    from auditing import votes as votes_lib

    kept = votes_lib.read_real_votes().kept
    fitted = aggregation.aggregate(kept)
    errors = fitted.errors_  # (rater_id, answer) x (absent, present)
    raters = errors.index.get_level_values("rater_id").unique()
    matrices = np.stack([errors.loc[r].reindex(list(votes_lib.ANSWERS)).to_numpy().T for r in raters])  # (R, 2, 3)
    share = kept["rater_id"].value_counts().reindex(raters).to_numpy(np.float64)
    per_question = kept.groupby(["file_name", "label"], observed=True).size().to_numpy()
    per_image = kept.drop_duplicates(["file_name", "label"]).groupby("file_name").size().to_numpy()
    return {"raters": np.asarray(raters, dtype=str), "matrices": matrices, "rater_share": share / share.sum(),
            "votes_per_question": per_question, "questions_per_image": per_image,
            "prior_present": float(fitted.scores_["score"].mean())}


def synthetic_votes(n_votes: int, model: dict, folder: Path, seed: int = 0) -> list[str]:
    """About ``n_votes`` votes as Parquet files in ``folder`` (module docstring)."""
    rng = np.random.default_rng(seed)
    mean_votes = model["votes_per_question"].mean() * model["questions_per_image"].mean()
    n_images = int(np.ceil(n_votes / mean_votes))
    paths, written, image0, part = [], 0, 0, 0
    log_share = np.log(model["rater_share"])
    while written < n_votes:
        images = max(1, min(n_images - image0, int(FILE_VOTES / mean_votes)))
        q_per_image = np.minimum(rng.choice(model["questions_per_image"], images), 1000)
        n_q = int(q_per_image.sum())
        image = np.repeat(np.arange(image0, image0 + images), q_per_image)
        # Distinct labels per image: a random offset plus the question's rank in its image.
        rank = np.arange(n_q) - np.repeat(np.cumsum(q_per_image) - q_per_image, q_per_image)
        label = (np.repeat(rng.integers(0, 1000, images), q_per_image) + rank * 7) % 1000
        truth = rng.random(n_q) < model["prior_present"]
        v = np.minimum(rng.choice(model["votes_per_question"], n_q), len(model["raters"]))
        # Distinct raters per question, weighted by their share: Gumbel top-k, in blocks.
        rater = np.empty(int(v.sum()), np.int64)
        offset = 0
        for start in range(0, n_q, 50_000):
            block = slice(start, min(n_q, start + 50_000))
            keys = log_share[None, :] + rng.gumbel(size=(block.stop - block.start, len(log_share)))
            order = np.argsort(-keys, axis=1)
            take = np.arange(len(log_share))[None, :] < v[block][:, None]
            chosen = order[take]
            rater[offset:offset + len(chosen)] = chosen
            offset += len(chosen)
        question = np.repeat(np.arange(n_q), v)
        p = model["matrices"][rater, truth[question].astype(int)]  # (votes, 3)
        answer = (rng.random(len(rater))[:, None] > np.cumsum(p, axis=1)[:, :2]).sum(axis=1)
        frame = pd.DataFrame({
            "file_name": pd.Categorical.from_codes(image[question] - image0, categories=[
                f"synthetic_{i:08d}.JPEG" for i in range(image0, image0 + images)]),
            "label": label[question].astype(np.int64),
            "rater_id": pd.Categorical.from_codes(rater, categories=list(model["raters"])),
            "answer": pd.Categorical.from_codes(answer, categories=["no", "maybe", "yes"])})
        path = folder / f"votes-{part:04d}.parquet"
        frame.to_parquet(path, index=False)
        paths.append(str(path))
        written += len(frame)
        image0 += images
        part += 1
    return paths


def _peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(kind: str, paths: list[str], out: str) -> None:
    """In a subprocess: one path on the files; prints its wall time and counts as JSON."""
    start = time.perf_counter()
    if kind == "beam":
        from pipelines import beam_aggregation

        result = beam_aggregation.aggregate_sharded(paths, METHOD, {}, out)
        info = {"n_iter": result.n_iter_, "questions": result.counts["questions"], "kept": result.counts["kept"],
                "runs": result.pipeline_runs, "shards": result.counts["shards"]}
    else:
        from auditing import aggregation
        from auditing import votes as votes_lib

        kept = votes_lib.read_and_validate(paths).kept
        result = aggregation.aggregate(kept, METHOD)
        result.scores_.to_parquet(Path(out) / "scores.parquet", index=False)
        info = {"n_iter": result.n_iter_, "questions": len(result.scores_), "kept": len(kept)}
    info["seconds"] = time.perf_counter() - start
    info["peak_gb"] = _peak_rss_kib() / 2 ** 20
    print(json.dumps(info))


def _measure(kind: str, paths: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aggregation_scale", "--child", kind,
                           "--out", str(out) + "/", *paths], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--votes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--crowdkit-max-votes", type=int, default=5_000_000)
    parser.add_argument("--work", default=None, help="folder for the synthetic votes (default: a temp dir)")
    parser.add_argument("--child", choices=["beam", "crowdkit"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.paths, args.out)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="aggregation_scale_"))
    print("SYNTHETIC votes drawn from the ReaL raters' Dawid-Skene confusion matrices and the ReaL "
          "questions-per-image / votes-per-question distributions (raters.npz); not real votes.", flush=True)
    model = real_vote_model()
    print(f"measured on ReaL: {len(model['raters'])} raters, {model['votes_per_question'].mean():.2f} votes per "
          f"question, {model['questions_per_image'].mean():.2f} questions per image, P(present) "
          f"{model['prior_present']:.3f}", flush=True)
    line = {}
    for n in args.votes:
        folder = work / f"votes_{n}"
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        paths = synthetic_votes(n, model, folder)
        print(f"{n:,} votes: {len(paths)} Parquet files in {time.perf_counter() - t:.0f} s", flush=True)
        beam = _measure("beam", paths, work / f"beam_{n}")
        print(f"  beam (DirectRunner in-process): {beam}", flush=True)
        crowdkit = _measure("crowdkit", paths, work / f"crowdkit_{n}") if n <= args.crowdkit_max_votes else None
        print(f"  crowd-kit in memory: {crowdkit if crowdkit else 'not run (above --crowdkit-max-votes)'}",
              flush=True)
        ok = crowdkit and "seconds" in crowdkit and "seconds" in beam
        line = {"votes": n, "method": METHOD, "beam_s": round(beam.get("seconds", float("nan")), 1),
                "beam_peak_gb": round(beam.get("peak_gb", float("nan")), 2),
                "crowdkit_s": round(crowdkit["seconds"], 1) if ok else None,
                "crowdkit_peak_gb": round(crowdkit["peak_gb"], 2) if ok else None,
                "ratio": round(beam["seconds"] / crowdkit["seconds"], 2) if ok else None}
        print(f"  {json.dumps(line)}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        for kind in ("beam", "crowdkit"):
            shutil.rmtree(work / f"{kind}_{n}", ignore_errors=True)
    print("(measured on a 2-core machine shared with other jobs: times are under load)")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
