"""`python -m itmatch ...` (and `torchrun -m itmatch train ...`): the same command line as `itmatch`."""

import sys

from itmatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
