import sys

from spicetap.entry import run

sys.exit(run())
