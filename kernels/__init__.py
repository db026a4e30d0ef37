"""Triton kernels for the ConvNeXt and attention blocks of Stable Cascade, each beside its reference."""
