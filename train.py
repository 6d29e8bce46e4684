"""Train a LLaVA model with llava_loop.

python train.py --config configs/demo.yaml [key=value ...]                      # one process, debugger-friendly
accelerate launch --config_file accelerate_config.yaml train.py --config ...    # DeepSpeed ZeRO-2, N processes
"""

import sys

from llava_loop.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
