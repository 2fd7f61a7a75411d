"""Networks, the one architecture registry, checkpoints, Caffe import and the model registry (names, fetch, cache)."""
