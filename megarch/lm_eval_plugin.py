"""Teach the stock ``lm_eval`` command the model name ``megarch``, without importing anything.

lm-evaluation-harness 0.4 finds models only in its own table (``lm_eval.models``) or among
classes imported into the process; it has no plugin discovery. So that

    lm_eval --model megarch --model_args checkpoint=PATH --tasks ...

works as its documentation promises for any model, megarch installs a one-line
``megarch-lm-eval.pth`` into site-packages (setup.py) that calls :func:`install` when Python
starts. :func:`install` imports nothing: it adds an import hook that waits for
``lm_eval.models`` (lm-eval's model table, imported by lm-eval before any model lookup) and,
right after that module runs, registers ``megarch`` as a lazy placeholder for
:class:`megarch.eval.lm_eval_adapter.MegarchLM`. torch and megarch's model code are imported
only when lm-eval asks for that model. Processes that never import lm-eval pay for two tiny
module imports; nothing of lm-eval or torch is patched. (This module sits at the package root,
not in :mod:`megarch.eval`, because importing ``megarch.eval`` imports torch.)

Registration failures (an lm-eval whose registry changed) become one warning, never an error at
interpreter start; ``megarch-lm-eval`` (the same command line with the model imported first)
keeps working either way.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

MODEL_NAME = "megarch"
MODEL_PATH = "megarch.eval.lm_eval_adapter:MegarchLM"
"""The placeholder lm-eval materialises (``module:class``) when ``--model megarch`` is asked."""
WATCHED = "lm_eval.models"


def register() -> None:
    """Register ``megarch`` in lm-eval's model registry as a lazy placeholder (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_PATH)


def _register_quietly() -> None:
    try:
        register()
    except Exception as err:  # never break lm-eval (or interpreter start) over the plugin
        warnings.warn(f"megarch could not register its lm-eval model ({err!r}): use "
                      "megarch-lm-eval instead of lm_eval", RuntimeWarning, stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the watched module with its own loader, then registers megarch."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register_quietly()

    def __getattr__(self, name: str):  # resource readers, get_filename, ...
        return getattr(self._loader, name)


class _Watcher(importlib.abc.MetaPathFinder):
    """One-shot finder: wraps the loader of :data:`WATCHED`, then leaves ``sys.meta_path``."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != WATCHED:
            return None
        uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Register now if lm-eval's model table is already imported, else when it is."""
    if WATCHED in sys.modules:
        _register_quietly()
    elif not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())


def uninstall() -> None:
    """Remove the import hook (nothing if it is not there)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Watcher)]
