"""`ray job submit` entrypoint for `mapray evolve`: the same function as the CLI verb.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evolve.py --from s3://bucket/round0 --config deploy/selfplay.yaml --set output=s3://bucket/round1

Inside a submitted job RAY_ADDRESS is set, so mapray connects to the cluster instead of starting a local Ray.
"""

import sys

from mapray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evolve", *sys.argv[1:]]))
