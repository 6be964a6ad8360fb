"""Diagnostics that show *where* CoT fine-tuning moved a model's routing, and whether it matters.

* :mod:`.drift` — weights only: how far Q, K, V, O and the per-head bilinear form ``W_Qᵀ W_K`` moved
  between PRE and POST, without running the model;
* :mod:`.attention` — the paper's mean attention distance (Eq. 17) per head, from a real forward pass
  on a synthetic needle prompt, and the four-panel attention-map comparison (Figure 4);
* :mod:`.autocorr` — the token autocorrelation ρ(d) of a corpus and its decay length τ (Figure 3);
* :mod:`.niah` — a small RULER-style needle-in-a-haystack probe on transformers generation;
* :mod:`.plots` — matplotlib figures for all of the above (an optional extra).

Everything mathematical is a pure function over arrays; reading checkpoints, loading models and
drawing live at the edges, so the math can be tested against explicit computations.
"""
