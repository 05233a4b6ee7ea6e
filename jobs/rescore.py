"""`ray job submit` entrypoint for scheduled rescoring: `mapray rescore` (score, reusing the cache for every
model that did not change)."""

import sys

from mapray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rescore", *sys.argv[1:]]))
