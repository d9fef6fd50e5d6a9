"""What each backend reads, checked before anything is opened: one message per problem, naming
the config key and how to fix it.

==========  ==========================================  ======================================
backend     reads (config key)                          prepare with
==========  ==========================================  ======================================
torch       ``data.rec``: folder with train.rec,        nothing (insightface layout as is)
            train.idx (and property)
ffcv        ``data.ffcv_file``: a packed file           ``python -m unpg.tools.pack``
dali        ``data.dali_dir``: a prepared folder        ``python -m unpg.tools.prepare_dali``
==========  ==========================================  ======================================

Only the key of the chosen backend matters: ``loader.name=ffcv data.ffcv_file=X data.rec=`` is
a complete configuration.
"""
from __future__ import annotations

from pathlib import Path

BACKENDS = ("torch", "ffcv", "dali")
_OTHERS = ("or choose another loader: loader.name=ffcv with data.ffcv_file, loader.name=dali "
           "with data.dali_dir, loader.name=torch with data.rec")


def check_source(data, loader_name: str) -> str:
    """The path the ``loader_name`` backend reads from the ``data`` config section (``DataConfig``),
    after checking it exists; ``ValueError`` naming the key and the fix otherwise."""
    if loader_name == "torch":
        return _check_rec(data.rec)
    if loader_name == "ffcv":
        return _check_packed(data.ffcv_file)
    if loader_name == "dali":
        return _check_dali(data.dali_dir, data.rec)
    raise ValueError(f"loader.name must be one of {', '.join(BACKENDS)}; got {loader_name!r}")


def _check_rec(rec: str) -> str:
    if not rec:
        raise ValueError(f"loader.name=torch reads data.rec, which is empty: set data.rec to the "
                         f"folder with train.rec, train.idx and property; {_OTHERS}")
    d = Path(rec)
    if not d.is_dir():
        raise ValueError(f"data.rec={rec}: no such folder; set data.rec to the folder with "
                         f"train.rec, train.idx and property")
    missing = [f for f in ("train.rec", "train.idx") if not (d / f).is_file()]
    if missing:
        raise ValueError(f"data.rec={rec}: missing {' and '.join(missing)}; the folder must hold an "
                         f"insightface rec (train.rec, train.idx, property)")
    return str(d)


def _check_packed(path: str) -> str:
    if not path:
        raise ValueError(f"loader.name=ffcv reads data.ffcv_file, which is empty: create a packed "
                         f"file with python -m unpg.tools.pack --rec DATA_DIR --out FILE and set "
                         f"data.ffcv_file=FILE; {_OTHERS}")
    if not Path(path).is_file():
        raise ValueError(f"data.ffcv_file={path}: no such file; create it with python -m "
                         f"unpg.tools.pack --rec DATA_DIR --out {path}")
    return str(path)


def _check_dali(dali_dir: str, rec: str) -> str:
    # data.rec is accepted as a fallback only to explain how to prepare it (read_prepared refuses
    # an insightface rec with the prepare_dali command line).
    directory = dali_dir or rec
    if not directory:
        raise ValueError(f"loader.name=dali reads data.dali_dir, which is empty: prepare a folder "
                         f"with python -m unpg.tools.prepare_dali --rec DATA_DIR --out DIR and set "
                         f"data.dali_dir=DIR; {_OTHERS}")
    if not Path(directory).is_dir():
        key = "data.dali_dir" if dali_dir else "data.rec"
        raise ValueError(f"{key}={directory}: no such folder; prepare one with python -m "
                         f"unpg.tools.prepare_dali --rec DATA_DIR --out {directory}")
    return str(directory)
