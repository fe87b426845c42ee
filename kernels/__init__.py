"""Triton kernels of ACF, installed as ``acf.kernels``."""
