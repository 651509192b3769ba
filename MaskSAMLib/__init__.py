"""MaskSAMLib: MaskSAM (prompt-free SAM for 3D medical images) as a library.

No Qt or slicer imports: the same code serves the CLI, batch jobs, training and the Slicer
module (which runs it in a child process). Heavy modules import lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: The one research notice: CLI help, demo, every JSON sidecar (``notice``).
RESEARCH_NOTICE = (
    "Research use only: MaskSAMSlicer is not a medical device and is not for diagnosis. No "
    "clinically trained model ships with it."
)

__all__ = ["RESEARCH_NOTICE", "__version__"]
