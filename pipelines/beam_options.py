"""Pipeline options built from an explicit argv list, never from sys.argv.

Beam's default DirectRunner first tries to download the Prism binary (no network
here) and only then falls back, so the runner is always named explicitly.

Runners, by the name a config or flag uses: ``direct`` (in-process), ``direct-multiprocess``,
``portable`` (a job service plus SDK worker processes over the Fn API, as Dataflow Runner
v2, Flink and Spark run Python; see ``pipelines.portable``) and ``dataflow``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

# Local runners, by the name a config or flag uses.
LOCAL_RUNNERS = {
    # In-process FnApiRunner: fastest for small jobs and tests.
    "direct": ["--runner=DirectRunner", "--direct_running_mode=in_memory"],
    # Separate worker processes (fresh interpreters: safe with JAX, which must not fork).
    "direct-multiprocess": ["--runner=DirectRunner", "--direct_running_mode=multi_processing"],
}
RUNNERS = (*LOCAL_RUNNERS, "portable", "dataflow")


def make_options(runner: str = "direct", num_workers: int = 1, extra_args: Sequence[str] = (), *,
                 job_endpoint: str = "embed", environment_config: str | None = None) -> PipelineOptions:
    """Options for ``runner`` (one of ``RUNNERS``).

    ``portable`` needs ``environment_config`` (``HOST:PORT`` of a running worker pool);
    ``runner_options`` starts one when there is none. ``dataflow`` takes its project,
    region, temp_location, sdk_container_image... in ``extra_args``."""
    if runner in LOCAL_RUNNERS:
        argv = list(LOCAL_RUNNERS[runner]) + [f"--direct_num_workers={num_workers}"]
    elif runner == "portable":
        if environment_config is None:
            raise ValueError("runner 'portable' needs environment_config (a worker pool's HOST:PORT); "
                             "use beam_options.runner_options to start one")
        from pipelines.portable import portable_args

        argv = portable_args(environment_config, job_endpoint, num_workers)
    elif runner == "dataflow":
        argv = ["--runner=DataflowRunner"]
    else:
        raise ValueError(f"unknown runner {runner!r}; expected one of {list(RUNNERS)}")
    return PipelineOptions(argv + list(extra_args))


@contextlib.contextmanager
def runner_options(runner: str = "direct", num_workers: int = 1, extra_args: Sequence[str] = (), *,
                   job_endpoint: str = "embed", environment_config: str | None = None
                   ) -> Iterator[PipelineOptions]:
    """``make_options`` as a context manager: for ``portable`` without an
    ``environment_config`` it starts a worker pool for the block and stops it after."""
    if runner == "portable" and environment_config is None:
        from pipelines.portable import worker_pool

        with worker_pool() as address:
            yield make_options(runner, num_workers, extra_args, job_endpoint=job_endpoint,
                               environment_config=address)
        return
    yield make_options(runner, num_workers, extra_args, job_endpoint=job_endpoint,
                       environment_config=environment_config)
