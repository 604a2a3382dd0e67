"""Commands around training: planning, benchmarks, sweeps and the quickstart."""
