"""cmlab's benchmarks, a package run from the repository root: `python -m bench.run` (see
README.md here). Each `bench_*.py` imports the shared pieces as `bench._common`."""
