"""`python -m lminfluence` is the `lminfluence` command."""

import sys

from .cli.main import main

sys.exit(main())
