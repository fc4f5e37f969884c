"""Foreign checkpoint formats: Megatron-LM's legacy pickles, Megatron-DeepSpeed, Hugging Face (see convert)."""
