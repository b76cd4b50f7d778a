"""FLUX's fixed geometry: the numbers every part that turns pixels into tokens shares (no imports, no torch).

The AE maps 8x8 pixels to one latent pixel of 16 channels; the transformer packs 2x2 latent pixels into one
token of 64 features. So a trained or sampled image side is a multiple of 16 pixels.
"""

LATENT_CHANNELS = 16  # FLUX AE latent channels
AE_DOWNSAMPLE = 8  # image pixels per latent pixel (each side)
PATCH = 2  # latent pixels per token (each side)
PIXEL_MULTIPLE = AE_DOWNSAMPLE * PATCH  # 16: image sides are multiples of this
MLP_RATIO = 4.0  # FLUX.1's MLP width / hidden width (the model reads it from shapes; LoRA conversion may not)
