#!/usr/bin/env python3
"""Sample a model (any number of ranks) into an ADM .npz and a grid. Same as
``python -m dis_dist.sample``; ``--help`` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dis_dist.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
