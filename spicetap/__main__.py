import sys

from spicetap.cli import main

sys.exit(main())
