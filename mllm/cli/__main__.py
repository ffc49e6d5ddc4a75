"""`python -m mllm.cli <verb> ...` (what the scripts under scripts/ run, e.g. under torchrun): the `mllm` command."""

import sys

from mllm.cli.main import main

sys.exit(main())
