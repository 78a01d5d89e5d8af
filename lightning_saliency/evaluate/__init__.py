"""What the maps say: scores equal to Quantus's, the mask-free shortcut probes, the sanity
check, the faithfulness curves, the alarm rules and the score monitor that keeps the public
record. Built on :mod:`lightning_saliency.engine` only.
"""
