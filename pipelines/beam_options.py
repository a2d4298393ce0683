"""Pipeline options built from an explicit argv list, never from sys.argv.

Beam's default DirectRunner first tries to download the Prism binary (no network
here) and only then falls back, so the runner is always named explicitly.
"""
from __future__ import annotations

from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

# Local runners, by the name a config or flag uses.
LOCAL_RUNNERS = {
    # In-process FnApiRunner: fastest for small jobs and tests.
    "direct": ["--runner=DirectRunner", "--direct_running_mode=in_memory"],
    # Separate worker processes (fresh interpreters: safe with JAX, which must not fork).
    "direct-multiprocess": ["--runner=DirectRunner", "--direct_running_mode=multi_processing"],
}


def make_options(runner: str = "direct", num_workers: int = 1,
                 extra_args: Sequence[str] = ()) -> PipelineOptions:
    """Options for ``runner`` ('direct', 'direct-multiprocess' or 'dataflow')."""
    if runner in LOCAL_RUNNERS:
        argv = list(LOCAL_RUNNERS[runner]) + [f"--direct_num_workers={num_workers}"]
    elif runner == "dataflow":
        argv = ["--runner=DataflowRunner"]
    else:
        raise ValueError(f"unknown runner {runner!r}; expected one of "
                         f"{sorted(LOCAL_RUNNERS) + ['dataflow']}")
    return PipelineOptions(argv + list(extra_args))
