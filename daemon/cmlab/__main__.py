import sys

from cmlab.cli import main

sys.exit(main())
