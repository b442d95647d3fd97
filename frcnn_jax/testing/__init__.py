"""Shared test and benchmark support (not used by the library itself).

- `inputs`: random boxes and scores shaped like detector inputs (numpy only).
- `torch_reference`: torchvision reference models (R-50-FPN, R-50-C4), calibration and
  structured images for parity checks. It imports torch and torchvision (the optional
  `torch` extra); nothing else in `frcnn_jax` imports it or torch.
"""
