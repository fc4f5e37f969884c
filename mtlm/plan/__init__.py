"""Plan mode: what each device holds and how fast a config runs on a cluster, without running it.

    python -m mtlm.plan model=gpt2_8.3b parallel.tensor=8 parallel.data=64 precision=fp16 cluster=dgx2h_v100

sizing.py (one tensor rank built on the meta device; memory per device), perf.py (the performance model's
formulas), probe.py (this machine: cores, GEMM rates, gloo all-reduce, the calibration run), planner.py (a config
+ a cluster -> plan.json), compare.py (plans in a sweep's report), __main__.py (the Hydra app). The formulas and
every constant's source: docs/planner.md.
"""
