"""Backbones (diffusers transformers, LoRA), text encoders and VAEs. Pure PyTorch/diffusers."""
