"""Zero-shot evaluation as in the paper's Table 3 (WikiText-103 adjusted perplexity, strict LAMBADA), the
lm-evaluation-harness adapter, and text generation. Entry points: `python -m mtlm.evaluate`,
`python -m mtlm.generate`, `python -m mtlm.eval` (lm-eval's CLI with the `mtlm` model registered)."""
