"""Run every benchmark in turn (`make bench`). Each prints its own ratio against a
reference measured in the same run. pooling_scale needs ~4 GB of temporary disk and
a few minutes; pass names to run a subset: python -m benchmarks.run_all votes_to_labels"""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("votes_to_labels", "aggregation_fidelity", "jit_predictor", "inference_throughput",
              "pooling_scale", "aggregation_scale", "sensitivity")


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    for name in names:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        module.main([]) if name != "jit_predictor" else module.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
