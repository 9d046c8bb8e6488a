import sys

from dirtytrack.cli import main

sys.exit(main())
