"""`ray job submit` entrypoint for `mapray selfplay`: the same function as the CLI verb.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/selfplay.py --config deploy/selfplay.yaml

Inside a submitted job RAY_ADDRESS is set, so mapray connects to the cluster instead of starting a local Ray.
"""

import sys

from mapray.cli import main

if __name__ == "__main__":
    sys.exit(main(["selfplay", *sys.argv[1:]]))
