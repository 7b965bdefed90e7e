"""lowrank: low-rank (SVD) compression of pretrained causal language models.

The package is the numerical core of the pipeline. It never imports Snakemake and knows nothing of the
``results/`` layout: every function takes tensors, modules or explicit paths. Importing the package itself is
cheap (no torch import), so the workflow can read :mod:`lowrank.configs` while it parses.

Importing it also registers the ``lowrank`` quantizer with transformers (:mod:`lowrank.hf_format`), so that
``AutoModelForCausalLM.from_pretrained`` loads a lowrank folder with its factors. To stay cheap, the registration
waits for transformers: it runs at once if ``transformers.quantizers.auto`` is already imported, else right after
that module is first imported (a one-shot import hook).
"""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"
__all__ = ["__version__"]

_QUANTIZERS_MODULE = "transformers.quantizers.auto"


def _register_quantizer() -> None:
    partial = sys.modules.get(__name__ + ".hf_format")
    if partial is not None and not hasattr(partial, "register"):
        return  # lowrank.hf_format is importing transformers itself; it registers when its import completes
    from .hf_format import register

    register()


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the wrapped loader, then registers the lowrank quantizer in the freshly imported module."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._inner.exec_module(module)
        _register_quantizer()

    def __getattr__(self, name: str):  # noqa: ANN204  (get_source, get_filename, ... of the inner loader)
        return getattr(self._inner, name)


class _QuantizerHook(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` through the other finders and wraps its loader, once."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != _QUANTIZERS_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


if _QUANTIZERS_MODULE in sys.modules:
    _register_quantizer()
elif not any(isinstance(f, _QuantizerHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuantizerHook())
