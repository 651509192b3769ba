"""Training: per-slice targets, Hungarian matching, Mask2Former-style losses and the trainer.

- :mod:`.targets` turns a label map ``(B, T, H, W)`` into per-slice targets (one binary mask and
  one normalized xyxy box per class present, background included).
- :mod:`.boxes` holds box helpers (tight box of a mask, generalized IoU).
- :mod:`.matcher` matches queries to targets per slice (``scipy.optimize.linear_sum_assignment``)
  with masks compared on randomly sampled points.
- :mod:`.criterion` computes the weighted loss from the network's output dict.
"""
