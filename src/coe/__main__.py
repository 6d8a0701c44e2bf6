import sys

from coe.cli import main

sys.exit(main())
