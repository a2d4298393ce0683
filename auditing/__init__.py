"""label-audit: auditing."""
