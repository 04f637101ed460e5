"""ViT encoders, MLP heads, the PatchMix loss and framework."""
