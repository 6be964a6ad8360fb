"""qkrestore: restore the query/key routing of softmax-attention layers after CoT fine-tuning."""

__version__ = "0.1.0"
