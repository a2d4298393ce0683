"""label-audit: models."""
