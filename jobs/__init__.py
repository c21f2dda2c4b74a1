"""Spark entry points: a pure partition function (partition.py) plus thin wiring (fuse.py)."""
