#!/usr/bin/env python
"""Entry point for ``deepspeed``, ``torchrun`` and plain ``python``; also accepts the reference's main.py flags.

deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json --config run.json
torchrun --nproc_per_node 8 launch/pretrain.py --ds_config ds_configs/fsdp.json --config run.json
python launch/pretrain.py --use_checkpoint --batch_size 1 --num_steps 1000 --lrdecay --roi_x 96 ...
"""

import sys
from pathlib import Path

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl3d.cli import pretrain_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pretrain_main())
