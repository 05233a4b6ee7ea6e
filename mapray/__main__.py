import sys

from mapray.cli import main

sys.exit(main())
