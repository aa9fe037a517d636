"""Entry point for `ray job submit --working-dir . -- python jobs/sweep.py -s sweeps/NAME.yaml ...`: same as `apexdistill sweep ...`."""

import sys

from apexdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
