"""Diagnostics that show *where* CoT fine-tuning moved a model's routing, and whether it matters.

* :mod:`.drift` — weights only: how far Q, K, V, O and the per-head bilinear form ``W_Qᵀ W_K`` moved
  between PRE and POST, without running the model;
* :mod:`.attention` — the paper's mean attention distance (Eq. 17) per head, from a real forward pass
  on a synthetic needle prompt, and the four-panel attention-map comparison (Figure 4);
* :mod:`.autocorr` — the token autocorrelation ρ(d) of a corpus and its decay length τ (Figure 3);
* :mod:`.locality` — on real prompts, the attention weight on the last k tokens and from the
  question onto the needle, per head.

The NIAH probe lives in :mod:`qkrestore.evaluate.niah` (the measurement engine ``sweep`` shares) and
the figures in :mod:`qkrestore.io.plots` (an optional extra).

Everything mathematical is a pure function over arrays; reading checkpoints, loading models and
drawing live at the edges, so the math can be tested against explicit computations.
"""
