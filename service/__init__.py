"""headstart serving code: image decoding, preprocessing and ONNX Runtime inference.

Nothing in this package imports torch or ``training``: the serving container stays small, and training imports
these same functions so that the accuracy it reports is the accuracy of the code that serves.
"""
