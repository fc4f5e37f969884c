"""Benchmarks: `python -m mtlm.bench` (step speed against transformers and the hardware, `--tp-scaling`),
`python -m mtlm.bench.memory` (memory per device)."""
