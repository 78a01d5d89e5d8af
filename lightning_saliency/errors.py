"""The one exception type users catch for a bad configuration."""

from lightning.fabric.utilities.exceptions import MisconfigurationException


class SaliencyConfigError(MisconfigurationException, ValueError):
    """A setting of lightning-saliency cannot work; the message names the fix.

    It is a Lightning ``MisconfigurationException`` (so it reads like Lightning's own errors)
    and a ``ValueError`` (so plain ``explain()`` users can catch it without Lightning).

    Examples:
        >>> try:
        ...     raise SaliencyConfigError("unknown method 'gradcan'")
        ... except ValueError as err:
        ...     print(err)
        unknown method 'gradcan'
    """
