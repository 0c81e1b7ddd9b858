import sys

from cetopt.cli import main

sys.exit(main())
