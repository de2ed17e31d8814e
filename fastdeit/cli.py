"""What the entry points under ``launch/`` share: a ``FastDeitError`` reported as one line.

Kept apart from ``errors.py`` because reporting asks which rank this is (``distributed``),
while every module, ``distributed`` included, raises the error types: one module holding both
made an import circle.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from fastdeit.distributed import env_from
from fastdeit.errors import FastDeitError, one_line

EXIT_STATUS = 2          # as argparse uses for usage errors


@contextmanager
def reported(prog: str = "fastdeit") -> Iterator[None]:
    """Around an entry point's ``main()``: a FastDeitError becomes one line on stderr and exit
    status 2; every other exception propagates with its traceback."""
    try:
        yield
    except FastDeitError as e:
        if not e.every_rank or env_from(os.environ).rank == 0:
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STATUS)
