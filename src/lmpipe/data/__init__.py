"""Data stages: collect, clean, validate, split."""
