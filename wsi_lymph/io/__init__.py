"""What is written to disk: the Zarr probability-map store and the per-slide output files."""
