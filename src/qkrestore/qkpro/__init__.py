"""qkpro."""
