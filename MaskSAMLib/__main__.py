"""``python -m MaskSAMLib``: the same command line as ``masksam``."""

from .cli import main

raise SystemExit(main())
