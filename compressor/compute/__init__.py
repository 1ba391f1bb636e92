"""Where the job learns and scores: the training device, mixed precision, data loading, and the
process group of a run under torchrun (docs/scale.md). Latency is measured elsewhere (compressor/latency/),
always on the profile's runtime and device, by rank 0 alone."""
