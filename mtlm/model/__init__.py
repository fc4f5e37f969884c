from mtlm.model.gpt import GPT, num_parameters

__all__ = ["GPT", "num_parameters"]
