"""Started first by every Python process the tests launch (tests/conftest.py and tests.helpers.pythonpath put this
directory on PYTHONPATH): mlflow is imported on first use, not before. DeepSpeed imports it in every process it
starts (its autotuner tries `import mlflow` at import time; three processes per launch: runner, node launcher,
rank) and that import alone costs about a second each on the CI machine. The report_to tests get the real mlflow
when they use it. And at exit, after the other exit handlers, the objects left are frozen (gc.freeze): the
interpreter's shutdown then skips its garbage collections over everything torch, transformers and DeepSpeed
loaded, about a second per process (1.7 s of a 10.6 s two-rank launch here); nothing the tests check happens
there (each run closes its own files and groups, and finish_deepspeed checks that no shared memory is left).
Then the interpreter's own sitecustomize, which this one shadows, runs as it would have."""

import atexit
import builtins
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

NAME = "mlflow"


class _OnFirstUse(types.ModuleType):
    """Stands in sys.modules for a module found but not imported yet. It has a name, file, spec, loader and
    package (`inspect.getmodule` reads every module's `__file__`, `importlib.util.find_spec` a spec); the first
    other attribute imports the real module, which then takes its place in sys.modules and fills this object."""

    def __getattr__(self, attr: str):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


class _Loaded(importlib.abc.Loader):
    """Gives the import system a module that is already in sys.modules, unchanged."""

    def __init__(self, module: types.ModuleType):
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system set its own


class _Submodules:
    """`import mlflow.x` while the stand-in is in sys.modules: the import system checks sys.modules for mlflow.x,
    then reads the stand-in's `__path__`, which imports the real mlflow, which imports mlflow.x; it would then
    load mlflow.x a second time (two copies of its classes). This finder hands it the one already loaded."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.startswith(NAME + ".") and name in sys.modules:
            return importlib.util.spec_from_loader(name, _Loaded(sys.modules[name]))
        return None


def _on_first_use() -> None:
    spec = importlib.util.find_spec(NAME)
    if spec is not None and spec.origin:
        module = _OnFirstUse(NAME)
        module.__file__, module.__spec__, module.__loader__, module.__package__ = spec.origin, spec, spec.loader, NAME
        sys.modules[NAME] = module
        sys.meta_path.insert(0, _Submodules)


def _chain() -> None:
    """The next sitecustomize on sys.path after this directory (once: this file may be on it twice)."""
    here = os.path.realpath(os.path.dirname(__file__))
    rest = [p for p in sys.path if os.path.realpath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and os.path.realpath(os.path.dirname(spec.origin or "")) != here:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if not getattr(builtins, "_pipeft_pyhooks", False):  # a second copy of this file, reached by _chain, does nothing
    builtins._pipeft_pyhooks = True
    _on_first_use()
    atexit.register(gc.freeze)  # registered first, so it runs last of the exit handlers
    _chain()
