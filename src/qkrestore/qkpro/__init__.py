"""QK-Pro: the closed-form solves (``closed_form``, pure torch) and the method that plans and
computes them for the pipeline (``method``). A package named ``qkpro`` because ``qkrestore.pro``
is the API function.
"""
