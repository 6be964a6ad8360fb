"""The restore itself: the plan (what rows to take from PRE), the methods, the writer (staging,
fsync, atomic rename), the model card and provenance, re-verification, recipes.
"""
