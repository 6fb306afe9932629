"""Benchmarks of jaxbn against other batch-norm implementations (issue 7).

Run ``python -m benchmarks.run`` from the repository root; see
``benchmarks/README.md`` for the options and what each column means.
"""
