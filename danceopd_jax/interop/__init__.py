"""PyTorch-ecosystem interop: diffusers / transformers checkpoints <-> our Flax NNX params.

Loading needs only ``safetensors`` and numpy (never torch). ``diffusers_sd3`` maps
``SD3Transformer2DModel`` <-> ``MMDiT``; ``transformers_text`` maps
``CLIPTextModelWithProjection`` -> ``CLIPTextEncoder`` and ``T5EncoderModel`` -> ``T5Encoder``.
"""
