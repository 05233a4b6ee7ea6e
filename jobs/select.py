"""`ray job submit` entrypoint for reselection from an existing output (no model runs): `mapray select`."""

import sys

from mapray.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
