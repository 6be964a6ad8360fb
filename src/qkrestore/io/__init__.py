"""The edge of the package: checkpoints on disk (validated safetensors headers, the weight set a
loader reads, folders from elsewhere), the Hugging Face Hub, torch/transformers loading, figures.

Nothing here knows about plans or methods; every layer above reads and writes through it.
"""
