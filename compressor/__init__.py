"""compressor: depth-prune PyTorch vision models under a latency target measured on the deployment runtime.

The Python API mirrors the CLI: `compressor.prune.prune(PruneConfig(...))`,
`compressor.units.find_units`, `compressor.surgery.remove_units`,
`compressor.criteria.score_units`, `compressor.latency.measure_latency_table`,
`compressor.fold.fold_batchnorm`. Importing the package needs only torch;
runtimes and exporters are imported when used.
"""

__version__ = "0.1.0"
