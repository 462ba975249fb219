"""Segment-masked attention: reference path, dispatch and (later) Triton kernels."""
