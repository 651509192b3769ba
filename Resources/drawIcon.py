"""Draw MaskSAMSlicer's 128x128 icon (a mask on a stack of CT slices) with Qt's QPainter.

    QT_QPA_PLATFORM=offscreen python Resources/drawIcon.py

writes ``Resources/MaskSAMSlicer.png`` (catalog icon) and
``MaskSAMSlicer/Resources/Icons/MaskSAMSlicer.png`` (module icon). Needs PySide6.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGETS = (REPO / "Resources" / "MaskSAMSlicer.png",
           REPO / "MaskSAMSlicer" / "Resources" / "Icons" / "MaskSAMSlicer.png")
SIZE = 128


def slicePolygon(y: float) -> QtGui.QPolygonF:
    """One CT slice seen in perspective: a flat parallelogram whose top edge is at ``y``."""
    return QtGui.QPolygonF([QtCore.QPointF(30, y), QtCore.QPointF(114, y),
                            QtCore.QPointF(98, y + 30), QtCore.QPointF(14, y + 30)])


def organPath(dy: float) -> QtGui.QPainterPath:
    """A liver-like outline lying on the top slice (flattened like the slice)."""
    path = QtGui.QPainterPath(QtCore.QPointF(34, 56 + dy))
    path.cubicTo(40, 38 + dy, 78, 34 + dy, 98, 42 + dy)
    path.cubicTo(108, 46 + dy, 104, 56 + dy, 92, 60 + dy)
    path.cubicTo(78, 66 + dy, 70, 74 + dy, 56, 76 + dy)
    path.cubicTo(42, 78 + dy, 28, 70 + dy, 34, 56 + dy)
    path.closeSubpath()
    return path


def drawIcon() -> QtGui.QImage:
    image = QtGui.QImage(SIZE, SIZE, QtGui.QImage.Format_ARGB32)
    image.fill(QtCore.Qt.transparent)
    p = QtGui.QPainter(image)
    p.setRenderHint(QtGui.QPainter.Antialiasing)

    background = QtGui.QLinearGradient(0, 0, 0, SIZE)
    background.setColorAt(0.0, QtGui.QColor("#274c77"))
    background.setColorAt(1.0, QtGui.QColor("#13263f"))
    p.setPen(QtCore.Qt.NoPen)
    p.setBrush(background)
    p.drawRoundedRect(QtCore.QRectF(2, 2, SIZE - 4, SIZE - 4), 22, 22)

    # Three stacked slices, back to front, the top one carrying the mask.
    for index, y in enumerate((78, 62, 46)):
        shade = 70 + 35 * index
        p.setBrush(QtGui.QColor(shade, shade + 10, shade + 25, 235))
        p.setPen(QtGui.QPen(QtGui.QColor(220, 230, 240), 1.6))
        p.drawPolygon(slicePolygon(y))

    organ = organPath(-4)
    p.setBrush(QtGui.QColor(231, 111, 81, 215))
    p.setPen(QtGui.QPen(QtGui.QColor("#fff4e6"), 2.4))
    p.drawPath(organ)
    # A second, smaller structure (kidney-like) in another colour: several classes at once.
    kidney = QtGui.QPainterPath(QtCore.QPointF(82, 58))
    kidney.cubicTo(88, 50, 100, 52, 99, 60)
    kidney.cubicTo(98, 66, 90, 68, 86, 64)
    kidney.cubicTo(84, 62, 80, 62, 82, 58)
    p.setBrush(QtGui.QColor(138, 201, 38, 225))
    p.setPen(QtGui.QPen(QtGui.QColor("#f1faee"), 1.8))
    p.drawPath(kidney)

    # The "auto prompt" spark: no clicks needed.
    p.setPen(QtCore.Qt.NoPen)
    p.setBrush(QtGui.QColor("#ffd166"))
    star = QtGui.QPainterPath()
    cx, cy, outer, inner = 100, 22, 13, 4
    for k in range(8):
        radius = outer if k % 2 == 0 else inner
        angle = k * math.pi / 4 - math.pi / 2
        point = QtCore.QPointF(cx + radius * math.cos(angle), cy + radius * math.sin(angle))
        if k == 0:
            star.moveTo(point)
        else:
            star.lineTo(point)
    star.closeSubpath()
    p.drawPath(star)
    p.end()
    return image


def main() -> int:
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    image = drawIcon()
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not image.save(str(target), "PNG"):
            print(f"could not write {target}", file=sys.stderr)
            return 1
        print(f"wrote {target}")
    del app
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
