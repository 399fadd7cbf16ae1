"""mxtools: convert, quantize and verify Mixtral-8x7B weights (HF, Mistral, GGUF)."""

__version__ = "0.1.0"
