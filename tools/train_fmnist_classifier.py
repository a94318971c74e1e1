#!/usr/bin/env python3
"""Train the Fashion-MNIST classifier that judges the demo's samples. Same as
``python -m dis_dist.eval.classifier``; ``--help`` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dis_dist.eval.classifier import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
