"""The command line's parser. It imports neither torch nor Lightning, so ``--help`` and argument
errors are instant; ``tests/test_cli.py`` checks its list of methods against the registry.
"""

from __future__ import annotations

import argparse

METHOD_NAMES = (
    "gradcam", "guided_gradcam", "dff", "integrated_gradients", "gradcam++", "xgradcam",
    "layercam", "hirescam", "eigencam", "scorecam", "ablationcam", "smoothgrad", "occlusion",
    "smoothgrad_sq", "vargrad", "ig_smoothgrad_sq", "saliency", "input_x_gradient",
    "guided_backprop", "deconvolution", "deeplift", "gradient_shap", "cam", "iscam", "sscam",
    "smoothgradcam++", "attention_rollout", "generic_attention", "legrad",
    "transformer_lrp", "transformer_attribution",
)  # fmt: skip
DEFAULT_METHODS = ("gradcam", "guided_gradcam", "dff", "integrated_gradients")
COMMAND = "lightning-saliency explain: a comparison figure of saliency methods for your own images."


class _Help(argparse.HelpFormatter):
    """A default shown only where it says something the help text does not."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-saliency",
        description="Saliency maps for image classifiers (lightning-saliency).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "explain",
        help="render a comparison figure of saliency methods for one or more images",
        description=COMMAND,
        formatter_class=_Help,
    )
    model = p.add_argument_group("model (one of --model or --arch)")
    model.add_argument(
        "--model",
        metavar="MODULE:NAME",
        help="import path of an nn.Module / LightningModule class or a factory "
        "function, e.g. my_pkg.models:LitClassifier",
    )
    model.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="weights for --model: a Lightning .ckpt or a state_dict file "
        "(loaded with weights_only=True)",
    )
    model.add_argument(
        "--arch",
        metavar="NAME",
        help="a torchvision (or, when installed, timm) architecture by name, e.g. resnet18 "
        "(random weights unless --weights)",
    )
    model.add_argument("--weights", metavar="PATH", help="state_dict file for --arch")
    model.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of --arch (default: read from --weights, else 1000)",
    )
    model.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow checkpoints that need weights_only=False (trusted files only)",
    )
    p.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="PATH",
        help="an image file; repeat for several",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated; one of: " + ", ".join(METHOD_NAMES),
    )
    p.add_argument(
        "--target",
        default="pred",
        help="class index to explain, 'pred', or MODULE:FUNCTION, a function from the model's "
        "output to one score per image (segmentation regions, regression)",
    )
    p.add_argument(
        "--target-layer",
        default=None,
        metavar="NAME",
        help="dotted module path; default: the last spatial feature map",
    )
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "nchw", "nhwc", "tokens"],
        help="how to read the target layer's output (nhwc: channels last, e.g. Swin; tokens: "
        "ViTs with any prefix tokens)",
    )
    p.add_argument("--labels", metavar="FILE", help="class names, one per line")
    p.add_argument("--size", default="224", help="images are resized to SIZE x SIZE")
    p.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="normalisation, one value per input channel (or one for all); default: "
        "ImageNet's for 3-channel models, none (0) otherwise",
    )
    p.add_argument(
        "--std",
        type=float,
        nargs="+",
        default=None,
        help="normalisation, one value per input channel (or one for all); default: "
        "ImageNet's for 3-channel models, none (1) otherwise",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the maps (0..1)")
    p.add_argument(
        "--sign",
        choices=("all", "positive", "negative", "absolute_value"),
        default="all",
        help="which part of signed maps (IG, SmoothGrad, Guided Grad-CAM) to show: all (blue "
        "-, red +, around zero), positive, negative or absolute_value",
    )
    p.add_argument("--rows", type=int, default=None, help="show at most N images (rows)")
    p.add_argument("--ig-steps", default="auto", help="IG steps, or 'auto' (the default)")
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="METHOD.OPTION=VALUE",
        help="any option of a chosen method (repeat for several); "
        "lightning_saliency.available_options() lists every method's options and defaults",
    )
    p.add_argument("--out", default="saliency.png", metavar="FIGURE.png", help="output figure")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    commands.add_parser(  # its arguments are the demo's own (cli/demo_command.py)
        "demo",
        help="train a small CNN on generated shapes with a planted shortcut and watch the "
        "callback catch it (lightning-saliency demo --help for its options)",
    )
    return parser
