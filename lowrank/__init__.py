"""lowrank: low-rank (SVD) compression of pretrained causal language models.

The package is the numerical core of the pipeline. It never imports Snakemake and knows nothing of the
``results/`` layout: every function takes tensors, modules or explicit paths. Importing the package itself is
cheap (no torch import), so the workflow can read :mod:`lowrank.configs` while it parses.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
