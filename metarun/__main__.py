import sys

from metarun.cli import main

sys.exit(main())
