"""mtlm's checkpoint format, shared by everything that reads or writes checkpoints: training
(mtlm/train/checkpoint.py saves and restores a run through it), `load_model` (mtlm/api.py), evaluation and
generation (mtlm/eval/), and the converters (mtlm/convert/). See format.py: an index of logical tensors in
metadata.json, their slices in per-rank safetensors files, read at any tensor degree.
"""
