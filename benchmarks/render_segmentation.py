"""A PNG of a real segmentation: reference (top row) and prediction (bottom row), axial |
coronal | sagittal through the reference's centre, over the image.

    python benchmarks/render_segmentation.py IMAGE REFERENCE PREDICTION MODEL_DIR OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from MaskSAMLib.data.io import read_volume
from MaskSAMLib.overlay import orthogonal_panels, write_png


def main() -> int:
    image_path, ref_path, pred_path, model_dir, out = sys.argv[1:6]
    image = read_volume(image_path)
    ref, pred = read_volume(ref_path), read_volume(pred_path)
    labels = json.loads((Path(model_dir) / "config.json").read_text())["labels"]
    lo, hi = np.percentile(image.array, [0.5, 99.5])
    figure = orthogonal_panels(image.array, [ref.array, pred.array], image.geometry, labels,
                               window=(float(lo), float(hi)), min_height=320)
    write_png(out, figure)
    print(out, figure.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
