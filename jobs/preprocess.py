"""Entry point for `ray job submit`: build (or find) the preprocessing cache for a config.

    ray job submit --working-dir . -- python jobs/preprocess.py -c CONFIG [--force] [key=value ...]

Same arguments as `apexdistill preprocess`; under `ray job submit` RAY_ADDRESS points at the cluster.
"""

from __future__ import annotations

import sys

from apexdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
