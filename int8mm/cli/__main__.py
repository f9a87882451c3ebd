"""``python -m int8mm.cli``."""
import sys

from . import main

sys.exit(main())
