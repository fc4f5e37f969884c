"""Makes `lm_eval --model mtlm` work without importing anything heavy at interpreter start.

The .pth file `python -m mtlm.eval install-hook` writes runs `install()` when Python starts. It only
adds an import finder (no torch, no lm_eval): when a program imports `lm_eval.api.registry`, the finder lets
the import happen and then registers the name `mtlm` as a lazy placeholder, so mtlm.eval.harness (and torch)
load only if a run asks for `--model mtlm`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

REGISTRY = "lm_eval.api.registry"
TARGET = "mtlm.eval.harness:MtlmLM"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)  # find the real module with the other finders, once
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            if "mtlm" not in module.model_registry:
                module.model_registry.register("mtlm", target=TARGET)

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
