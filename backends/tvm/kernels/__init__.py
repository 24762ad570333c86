"""TE compute definitions of the int8 kernels (one file per kernel).

Every dot-product kernel has three blocks: ``x_enc`` (activation re-encoding / padding),
``acc`` (the int32 reduction over packed weights, innermost block contiguous so it can be
tensorized) and ``out`` (zero-point correction + requantization, the reference formula).
"""
