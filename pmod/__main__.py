"""`python -m pmod ...`, e.g. under `accelerate launch -m pmod train RECIPE.yaml`."""

import sys

from .cli import main

sys.exit(main())
