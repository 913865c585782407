"""``python -m evamim ...`` (what ``torchrun -m evamim`` runs)."""

import sys

from evamim.cli import main

sys.exit(main())
