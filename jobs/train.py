"""Entry point for `ray job submit --working-dir . -- python jobs/train.py ...`: same as `apexdistill train ...`."""

import sys

from apexdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
