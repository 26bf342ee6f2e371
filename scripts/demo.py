"""Run the nnssl_joint end-to-end demo (same as `nnssl_joint demo`); `python scripts/demo.py --help`."""

import sys

from nnssl_joint.experiments.demo import main

if __name__ == "__main__":  # nnU-Net starts worker processes with spawn
    sys.exit(main())
