"""`ray job submit` entrypoint for scheduled rescoring: `mapray rescore` (score, reusing the cache for every
model that did not change). With `diff:` in the config it compares the selection with the previous run's before
publishing (diff.json, diff/) and exits 3, publishing nothing, when the churn is above `diff.max_churn`
(README "What changed since last night")."""

import sys

from mapray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rescore", *sys.argv[1:]]))
