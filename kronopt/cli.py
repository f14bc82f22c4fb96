"""Deprecated: moved to :mod:`kronopt.app.cli` (``bench`` to :mod:`kronopt.app.bench`).

The ``kronopt`` script now runs ``kronopt.app.cli:main``; ``python -m kronopt.app``
runs it too. This module warns on import and re-exports the old names.
"""

from kronopt._moved import warn

from kronopt.app._args import parse_sets
from kronopt.app.ablate import check_ablate
from kronopt.app.bench import BENCH_DEFAULT, bench, check_bench, cmd_bench, transformer_shapes
from kronopt.app.cli import build_parser, cmd_show, cmd_stages, main

__all__ = [
    "BENCH_DEFAULT",
    "bench",
    "build_parser",
    "check_ablate",
    "check_bench",
    "cmd_bench",
    "cmd_show",
    "cmd_stages",
    "main",
    "parse_sets",
    "transformer_shapes",
]

if __name__ == "__main__":
    warn("kronopt.cli", "kronopt.app.cli")
    raise SystemExit(main())
warn("kronopt.cli", "kronopt.app.cli")
