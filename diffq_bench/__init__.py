"""diffq-bench: reproduce, compare and extend differentiable quantization benchmarks."""
__version__ = "0.1.0"
