"""One rank of a training run on in-memory data (``tests/train/_helpers.py``).

Run as a script with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or
without them for one process: ``python _worker.py OUT_DIR key=value ...``. Trains with
``unpg.trainer.Trainer`` (the code path of unpg/train.py) and leaves its checkpoints and
metrics.jsonl in OUT_DIR/run.
"""
import os
import runpy
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    h = runpy.run_path(os.path.join(HERE, "_helpers.py"))
    from unpg.distributed import teardown_distributed
    from unpg.trainer import Trainer

    torch.set_num_threads(1)
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    images, labels = h["make_data"]()
    cfg = h["tiny_config"](out_dir, *overrides)

    def factory(cfg, rank, world, device, train=True):
        return h["MemoryLoader"](images, labels, cfg, rank, world, device, train)

    try:
        Trainer(cfg, loader_factory=factory).setup().train()
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
