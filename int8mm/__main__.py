"""``python -m int8mm``: the ``int8mm`` command."""
import sys

from .cli import main

sys.exit(main())
