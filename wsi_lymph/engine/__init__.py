"""Running slides on a cluster: the batch stream of Dask tasks and the cluster factory."""
