"""`ray job submit` entrypoint for reselection from an existing output (no model runs): `mapray select`.

(Not named select.py: the script's folder comes first on sys.path, and a `select` module there shadows the
standard library's, which asyncio needs.)"""

import sys

from mapray.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
