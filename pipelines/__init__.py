"""label-audit: pipelines (the Beam wiring, the stages, the runner, the CLI and all I/O)."""
from auditing import sources as _sources
from pipelines import download as _download

_sources.register_downloader(_download.download)
