"""The engine: the DAG and its cache keys, the executor, the artifact store, locks, Ray placement, jobs as stages, run directories."""
