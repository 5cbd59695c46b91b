"""`python -m ddistill.engine CONFIG.yaml key=value ...` (what torchrun / deepspeed / srun start on every rank)."""

import os
import sys

from ddistill.engine.trainer import train_command

if __name__ == "__main__":
    code = train_command()
    # All work and output are done; skip interpreter finalisation, where gloo's threads can abort the process
    # (deepspeed.md P5, pytorch/pytorch#190489) and turn a finished run into a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
