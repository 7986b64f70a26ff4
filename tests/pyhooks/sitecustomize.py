"""Started first by every Python process the tests launch (tests.helpers.start_deepspeed puts this directory on
PYTHONPATH): mlflow is imported on first use, not before. DeepSpeed imports it in every process it starts (its
autotuner tries `import mlflow` at import time; three processes per launch: runner, node launcher, rank) and that
import alone costs about a second each on the CI machine. The report_to tests get the real mlflow when they use
it. Then the interpreter's own sitecustomize, which this one shadows, runs as it would have."""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types


class _OnFirstUse(types.ModuleType):
    """Stands in sys.modules for a module found but not imported yet. It has a name, file and spec
    (`inspect.getmodule` reads every module's `__file__`, `importlib.util.find_spec` a spec); the first other
    attribute imports the real module, which then takes its place in sys.modules and fills this object."""

    def __getattr__(self, attr: str):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def _on_first_use(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin:
        module = _OnFirstUse(name)
        module.__file__, module.__spec__ = spec.origin, spec
        sys.modules[name] = module


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_on_first_use("mlflow")
_chain()
