"""Measuring restore candidates: the NIAH probe and its batched, teacher-forced scoring, the
one settings builder (``measuring``), the candidates swapped into one loaded model, ``sweep`` and
``select-layers``, with per-score intervals and resumable result files.
"""
