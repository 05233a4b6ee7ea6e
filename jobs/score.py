"""`ray job submit` entrypoint for a scoring run: the same function as `mapray score`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/score.py --config deploy/cluster.yaml

Inside a submitted job RAY_ADDRESS is set, so mapray connects to the cluster instead of starting a local Ray.
"""

import sys

from mapray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
