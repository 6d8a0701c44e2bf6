import sys

from coe.cli import entry

sys.exit(entry())
