#!/usr/bin/env python3
"""Export a training checkpoint to model.safetensors + config.json. Same as
``python -m dis_dist.train.export``; ``--help`` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dis_dist.train.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
