"""``python -m llamagraph``: the same as the ``llamagraph`` console script."""

import sys

from llamagraph.cli import main

if __name__ == "__main__":
    sys.exit(main())
