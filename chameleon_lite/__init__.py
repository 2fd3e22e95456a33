"""chameleon_lite: native multimodal models over discrete tokens, and an encoder-projector baseline to compare.

Images become VQ codes in the same vocabulary as text pieces; one early-fusion decoder reads and writes both.
"""

__version__ = "0.1.0"
