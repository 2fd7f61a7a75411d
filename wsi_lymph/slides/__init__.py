"""Slides read lazily, the model frame a network sees, and MATLAB-style bicubic resampling."""
