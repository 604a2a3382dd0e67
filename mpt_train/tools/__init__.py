"""Commands around training: planning, benchmarks and their records, sweeps, the quickstart,
and the generated parts of the docs."""
