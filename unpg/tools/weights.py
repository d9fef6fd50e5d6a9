"""CLI: import pretrained face-recognition weights into our backbones, and export them to ONNX.

    python -m unpg.tools.weights import SRC --out backbone.pth [--model NAME] [--format auto]
        [--head-out FILE | --no-head]
    python -m unpg.tools.weights export SRC --out model.onnx [--model NAME] [--opset 17]

Reading and verifying the weights (sources, name inference, the restricted unpickler of the
official code's whole-module checkpoints) is ``unpg.tools.weights_import``; the ONNX export and
its ONNX Runtime check is ``unpg.tools.onnx_export``. Their public names are re-exported here.
``import`` refuses an existing ``--out``/``--head-out`` unless ``--force`` (checked before reading).
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Optional, Sequence

from unpg.fileio import claim_output_file
from unpg.models import list_models
from unpg.tools.onnx_export import INPUT_SHAPE, export_onnx
from unpg.tools.weights_import import (
    FORMATS,
    ImportedWeights,
    SeedModule,
    UnsafeCheckpointError,
    import_weights,
    infer_backbone,
    load_restricted,
    save_atomic,
)

__all__ = ["FORMATS", "INPUT_SHAPE", "ImportedWeights", "SeedModule", "UnsafeCheckpointError",
           "export_onnx", "import_weights", "infer_backbone", "load_restricted", "main", "save_atomic"]




def _default_head_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.head{out.suffix or '.pth'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unpg.tools.weights",
                                description="Import insightface / official UNPG weights as plain state "
                                            "dicts of our backbones, or export a backbone to ONNX.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("src", help="weights: insightface backbone.pth, arcface_torch checkpoint, "
                                    "the official UNPG code's last.pt/best.pt, or our own state dict")
        sp.add_argument("--model", help=f"backbone name (default: inferred); one of {', '.join(list_models())}")
        sp.add_argument("--format", choices=FORMATS, default="auto",
                        help="state_dict (weights_only torch.load), seed (restricted unpickler), "
                             "auto: state_dict, then seed")

    imp = sub.add_parser("import", help="write a verified plain state dict (and the official code's head)")
    common(imp)
    imp.add_argument("--out", required=True, help="output state dict (.pth); must not exist unless --force")
    imp.add_argument("--force", action="store_true", help="replace existing --out / --head-out files")
    head = imp.add_mutually_exclusive_group()
    head.add_argument("--head-out", help="where to write the official code's class centres "
                                         "(default: OUT with .head before the suffix)")
    head.add_argument("--no-head", action="store_true", help="do not write the official code's head")

    exp = sub.add_parser("export", help="export to ONNX (dynamic batch) and check with ONNX Runtime")
    common(exp)
    exp.add_argument("--out", required=True, help="output .onnx file")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    exp.add_argument("--batch", type=int, default=2, help="batch size of the check (also batch+1)")
    exp.add_argument("--atol", type=float, default=1e-4,
                     help="max abs diff allowed, times max(1, largest |embedding|) (default 1e-4)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import":  # refuse an existing or unwritable output before reading
            claim_output_file(args.out, force=args.force)
            if args.head_out:
                claim_output_file(args.head_out, force=args.force, option="--head-out")
        w = import_weights(args.src, model=args.model, fmt=args.format)
        print(f"{args.src}: {w.source_format} weights of {w.model} (embedding size "
              f"{w.embedding_size}, {len(w.state_dict)} tensors)"
              + (f", {', '.join(f'{k} {v}' for k, v in w.meta.items())}" if w.meta else ""))
        if args.command == "import":
            out = Path(args.out)
            head_out = None
            if w.head is not None and not args.no_head:
                head_out = Path(args.head_out) if args.head_out else _default_head_path(out)
                # Checked before anything is written, so a refusal leaves no half import.
                claim_output_file(head_out, force=args.force, option="--head-out")
            save_atomic(w.state_dict, out)
            print(f"wrote {out} (loads strictly into build_backbone({w.model!r}, "
                  f"embedding_size={w.embedding_size}))")
            if head_out is not None:
                save_atomic(w.head, head_out)
                print(f"wrote {head_out} ({w.head['head']} head, {w.head['weight'].shape[0]} classes)")
        else:
            diff, scale = export_onnx(w.build(), args.out, opset=args.opset, batch=args.batch,
                                      atol=args.atol)
            print(f"wrote {args.out}; max abs diff ONNX Runtime vs torch: {diff:.3g} "
                  f"(embeddings up to {scale:.3g}; tolerance {args.atol:g} x max(1, that))")
    except (OSError, ValueError, ImportError, pickle.UnpicklingError) as e:
        print(f"weights: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
