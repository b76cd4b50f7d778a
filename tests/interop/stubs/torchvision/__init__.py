"""Import stub for torchvision, used ONLY by the ComfyUI/InvokeAI interop subprocesses.

The loaders import torchvision at module level for features the LoRA code paths never use, and the real
package cannot be installed next to the CPU torch pin. Every `torchvision.*` module and attribute resolves
to an inert placeholder; calling one raises, so a code path that really needs torchvision fails loudly.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0-stub"


class _Placeholder:
    def __init__(self, name: str):
        self._name = name

    def __call__(self, *a, **k):
        raise RuntimeError(f"torchvision stub: {self._name} is not available in the interop tests")

    def __getattr__(self, item: str):
        return _Placeholder(f"{self._name}.{item}")

    def __mro_entries__(self, bases):  # allow `class X(torchvision.something)`
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self.__name__}.{item}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StubModule
