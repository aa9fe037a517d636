"""Entry point for `ray job submit --working-dir . -- python jobs/evaluate.py ...`: same as `apexdistill evaluate ...`."""

import sys

from apexdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
