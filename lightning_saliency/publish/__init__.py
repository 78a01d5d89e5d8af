"""Where finished pictures, text and scalars go: each logger in its own idiom, a background
writer thread, and TensorBoard's event checksum in C. Knows nothing of saliency.
"""
