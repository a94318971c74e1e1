#!/usr/bin/env python3
"""Encode images into a latent cache (webdataset shards + manifest.json). Same as
``python -m dis_dist.data.encode``; ``--help`` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dis_dist.data.encode import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
