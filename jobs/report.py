"""`ray job submit` entrypoint for the report of an existing output (no model runs): `mapray report OUT`.

    ray job submit --working-dir . -- python jobs/report.py s3://bucket/run [--alphas 0,0.5,1] [--by source]
"""

import sys

from mapray.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
