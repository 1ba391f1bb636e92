"""`python -m compressor ...`, as torchrun runs it: `torchrun --nproc-per-node 2 -m compressor prune ...`."""

import sys

from compressor.cli.main import main

sys.exit(main())
