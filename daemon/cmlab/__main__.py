import sys

from cmlab.commands.cli import main

sys.exit(main())
