"""``lightning-saliency explain``: a comparison figure of saliency methods for your own images;
``lightning-saliency demo``: the shortcut demo (:mod:`.demo_command`).

    lightning-saliency explain --arch resnet18 --weights resnet18.pth --image cat.jpg \\
        --methods gradcam,guided_gradcam,dff,ig --out cat_saliency.png
    lightning-saliency explain --model my_pkg.models:LitClassifier --checkpoint last.ckpt \\
        --image a.png --image b.png --target pred

Nothing is downloaded: ``--arch`` builds the torchvision architecture with random weights and
loads ``--weights`` if given. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning_saliency.cli.messages import say
from lightning_saliency.cli.parser import DEFAULT_METHODS, METHOD_NAMES, build_parser

__all__ = ["DEFAULT_METHODS", "METHOD_NAMES", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-saliency`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own arguments
        from lightning_saliency.cli.demo_command import main as demo

        demo(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    from lightning_saliency.cli.explain_command import CliError, explain_command

    try:
        if args.command == "explain":
            explain_command(args)
        return 0
    except CliError as err:
        say(f"error: {err}")
        return 2
    except Exception as err:  # a bug or the model's own failure: still one line
        if os.environ.get("LIGHTNING_SALIENCY_DEBUG"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        say(
            f"error: {type(err).__name__}: {first} (set LIGHTNING_SALIENCY_DEBUG=1 for the "
            "traceback)"
        )
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
