"""mtlm: Megatron-LM's tensor model parallelism in plain PyTorch. `from mtlm import load_model`."""


def __getattr__(name: str):
    # Lazy, so `import mtlm.config` (train.py's fast config check) does not pay for torch and the model.
    if name == "load_model":
        from mtlm.api import load_model

        return load_model
    raise AttributeError(f"module 'mtlm' has no attribute {name!r}")


__all__ = ["load_model"]
