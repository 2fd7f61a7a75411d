"""wsi-lymph: lymphocyte detection in H&E whole-slide images (Janowczyk & Madabhushi 2016), on Dask."""

__version__ = "0.1.0"
