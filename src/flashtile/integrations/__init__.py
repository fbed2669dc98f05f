"""Adapters that plug flashtile's kernels into other libraries."""
