"""``python -m hf_contmerge …``: the CLI, also under ``accelerate launch -m hf_contmerge`` and ``torchrun -m hf_contmerge``."""

import sys

from .cli import main

sys.exit(main())
