#!/usr/bin/env python3
"""FID / sFID / IS / precision-recall of samples against a reference. Same as
``python -m dis_dist.eval.fid``; ``--help`` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dis_dist.eval.fid import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
