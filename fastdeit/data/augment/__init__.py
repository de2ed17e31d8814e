"""Batch operations on the training device, after the loader: RandAugment (randaug.py) and
3-Augment (threeaug.py) over the per-image kernels of imageops.py, then Mixup/CutMix and random
erasing (mixing.py), each whole-batch and seeded, never per image on the host.
"""
