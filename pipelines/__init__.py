"""label-audit: pipelines."""
