"""What every command-line entry point does alike: one log format, and errors a user can cause
(DisDistError) printed as one line with exit status 2 instead of a traceback. A process group
the command started is closed on the way out."""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from collections.abc import Callable

from dis_dist.errors import DisDistError

Main = Callable[[list[str] | None], int]


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cli_main(main: Main) -> Main:
    """Decorate ``main(argv) -> exit status``."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except DisDistError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            dist = sys.modules.get("torch.distributed")  # never imports torch just to check
            if dist is not None and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    return run


def number(kind: type, *, low: float = 0, low_ok: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number of ``kind`` above ``low`` (or at it, ``low_ok``):
    anything else is one line naming the flag."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(f"{text} must be {'at least' if low_ok else 'above'} {low:g}")
        return value

    return parse
