"""Triton kernels of inhibmoe_fast and their launchers, installed as ``inhibmoe_fast.kernels``.

Set ``TRITON_INTERPRET=1`` before this package is imported to run the kernels
on the CPU through the Triton interpreter.
"""
