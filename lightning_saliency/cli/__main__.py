"""``python -m lightning_saliency.cli``: the console script."""

import sys

from lightning_saliency.cli import main

sys.exit(main())
