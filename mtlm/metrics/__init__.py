"""Metrics: FLOPs accounting (flops) and where logged numbers go (sinks: console, jsonl, W&B)."""
