"""Running dialab over a dataset: configuration, manifest, output repository, units and executors."""
