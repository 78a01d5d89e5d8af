"""Catch a planted shortcut while it is being learnt: the README's demo, from a checkout.

The demo ships in the package (``lightning-saliency demo`` once installed); this runs the same,
with the same arguments (``--help``).

    python examples/shortcut_demo.py                          # the corner patch
    python examples/shortcut_demo.py --shortcut mark --no-masks
    python examples/shortcut_demo.py --clean                  # the control
"""

import sys

from lightning_saliency.cli.demo_command import main

if __name__ == "__main__":
    main(sys.argv[1:])
