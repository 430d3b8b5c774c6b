"""`python -m slimgraph`: the same command line as the `slimgraph` script."""

import sys

from slimgraph.cli import main

if __name__ == "__main__":
    sys.exit(main())
