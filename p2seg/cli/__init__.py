"""The installed commands (``p2seg-*`` console scripts, setup.py): point, semantic-source and
weight tools for users. Repository-only scripts (benchmarks, ablations) live in ``tools/``."""
