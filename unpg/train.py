"""Train a face-recognition model (margin softmax + optional UNPG negatives).

    torchrun --nproc_per_node=8 unpg/train.py --config configs/ms1mv2_r100_arcface_unpg.yaml
    python unpg/train.py --config configs/demo.yaml train.max_steps=100     # one process
    python -m unpg.train --config FILE optim.lr=0.05 --resume

Overrides are ``key=value`` with dotted config keys. The official code's flags are shorthands for config
keys: ``--model`` (model.name), ``--head`` (head.name), ``--unpg_wisk W`` (unpg.enabled=true,
unpg.wisk=W), ``--name`` (train.name), ``--weights`` (model.weights), ``--resume``
(train.resume=auto); explicit ``key=value`` overrides win over them.

Exit codes: 0 done, or stopped by SIGTERM after saving a checkpoint; 2 bad config, data or
output folder, found before training or during it (a corrupt sample under
``loader.on_corrupt=error``): one ``error:`` line on stderr says what to change; 3 the loss
stayed non-finite; SIGINT re-raises ``KeyboardInterrupt`` after saving.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (``python unpg/train.py``, torchrun): Python put unpg/ itself first on
    # sys.path, where our module names (eval, data, models, ...) would shadow top-level ones.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import logging  # noqa: E402
import traceback  # noqa: E402
from typing import List, Optional, Sequence  # noqa: E402

from unpg.config import load_config  # noqa: E402
from unpg.distributed import teardown_distributed  # noqa: E402
from unpg.loaders import CorruptSampleError  # noqa: E402
from unpg.runtime import tune_cpu_allocator  # noqa: E402
from unpg.trainer import NonFiniteLossError, Trainer  # noqa: E402

__all__ = ["build_parser", "main", "resolve_config", "shorthand_overrides"]

log = logging.getLogger("unpg.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unpg/train.py",
        description="Train a backbone with ArcFace/CosFace/MagFace margin softmax and UNPG. "
                    "Launch with torchrun for several processes/nodes.",
        epilog="Example: torchrun --nproc_per_node=8 unpg/train.py --config "
               "configs/ms1mv2_r100_arcface_unpg.yaml optim.lr=0.1 train.batch_size=512")
    p.add_argument("--config", help="YAML config (see configs/); defaults apply without it")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. optim.lr=0.05")
    official = p.add_argument_group("shorthands of the official code's flags")
    official.add_argument("--model", help="model.name (e.g. iresnet-34, iresnet100, mobilefacenet)")
    official.add_argument("--head", help="head.name (arcface, cosface, magface, combined)")
    official.add_argument("--unpg_wisk", "--unpg-wisk", type=float, metavar="W",
                      help="turn UNPG on with whisker W (unpg.enabled=true unpg.wisk=W)")
    official.add_argument("--name", help="train.name (run folder output_dir/name)")
    official.add_argument("--weights", help="model.weights: initial backbone weights")
    official.add_argument("--resume", action="store_true",
                      help="train.resume=auto: continue from the run folder's latest checkpoint")
    return p


def shorthand_overrides(args: argparse.Namespace) -> List[str]:
    """The official code's flags as ``key=value`` overrides (applied before explicit ones)."""
    out: List[str] = []
    if args.model is not None:
        out.append(f"model.name={args.model}")
    if args.head is not None:
        out.append(f"head.name={args.head}")
    if args.unpg_wisk is not None:
        out += ["unpg.enabled=true", f"unpg.wisk={args.unpg_wisk!r}"]
    if args.name is not None:
        out.append(f"train.name={args.name}")
    if args.weights is not None:
        out.append(f"model.weights={args.weights}")
    if args.resume:
        out.append("train.resume=auto")
    return out


def resolve_config(argv: Optional[Sequence[str]] = None):
    """Parse ``argv`` into a validated ``Config`` (raises ``ValueError`` on bad input)."""
    args = build_parser().parse_intermixed_args(argv)  # flags may follow key=value overrides
    return load_config(args.config, shorthand_overrides(args) + list(args.overrides))


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for one re-raised from a DataLoader worker (``Caught X in
    DataLoader worker ... Original Traceback ...``) the original message, its last line."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        name = f"{type(exc).__name__}: "
        text = last.split(name, 1)[1] if name in last else last
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse -> build -> train; the process group is always torn down."""
    _setup_logging()
    trainer = None
    try:
        try:
            cfg = resolve_config(argv)
            trainer = Trainer(cfg).setup()
            if trainer.device.type == "cpu":
                tune_cpu_allocator()  # before the training steps allocate their activations
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            result = trainer.train()
        except NonFiniteLossError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        except CorruptSampleError as exc:  # loader.on_corrupt=error met a corrupt sample
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            # The traceback's frames hold the loader's iterator in a reference cycle (torch
            # re-raises a worker's error from a local variable); cleared, trainer.close() frees
            # the iterator at once and its workers get their shutdown message.
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
            return 2
        log.info("finished: %s at step %d, checkpoint %s", result["reason"],
                 result["global_step"], result["checkpoint"])
        return 0
    finally:
        if trainer is not None:
            trainer.close()  # loader workers first: they ignore SIGTERM, so exit cannot kill them
        trainer = None  # release DDP and its process groups before they are destroyed
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
