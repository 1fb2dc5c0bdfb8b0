"""Tools built on the library: evaluation and prediction from any checkpoint, the demo, latency benchmarks,
and the experiment runner with its report."""
