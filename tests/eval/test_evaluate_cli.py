"""`python -m unpg.evaluate` end to end on a tiny .bin with a tiny registered backbone."""
import json
import pickle
import re

import numpy as np
import pytest
import torch

from unpg.eval.bins import read_bin_pickle
from unpg.eval.metrics import kfold_accuracy
from unpg.evaluate import load_state_dict, main
from unpg.models import build_backbone

SMALL_MBF = "{blocks: [1, 1, 1, 1], scale: 1}"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, fixtures_dir):
    """20 pairs of the shared .bin, a small mobilefacenet's weights and a bins config."""
    tmp = tmp_path_factory.mktemp("cli")
    blobs, issame = read_bin_pickle(fixtures_dir / "verification" / "synth_pairs.bin")
    (tmp / "tiny.bin").write_bytes(pickle.dumps((blobs[:40], issame[:20].tolist()), protocol=2))
    torch.manual_seed(0)
    net = build_backbone("mobilefacenet", embedding_size=32, blocks=(1, 1, 1, 1), scale=1)
    with torch.no_grad():  # non-trivial BN statistics so features differ between images
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.1, 0.1)
    torch.save(net.state_dict(), tmp / "weights.pth")
    (tmp / "bins.yaml").write_text(
        f"benchmark: bins\nroot: {tmp}\nnames: [tiny]\nbatch_size: 40\nflip: sum\n"
        f"normalize: insightface\noutput_dir: {tmp / 'out'}\n")
    return tmp, net.eval(), issame[:20]


def test_cli_end_to_end(tiny_setup, capsys):
    import cv2

    tmp, net, issame = tiny_setup
    rc = main(["--weights", str(tmp / "weights.pth"), "--data", str(tmp / "bins.yaml"),
               "--model", "mobilefacenet", "--embedding-size", "32", "--model-kwargs", SMALL_MBF,
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr()
    assert "10-fold acc" in out.out and "tiny" in out.out
    files = list((tmp / "out").glob("bins_weights_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["model"] == "mobilefacenet" and len(res["weights_sha256_16"]) == 16

    # Independent route: decode, normalise and run the model by hand, flip-sum, 10-fold.
    blobs, _ = read_bin_pickle(tmp / "tiny.bin")
    imgs = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                                  cv2.COLOR_BGR2RGB) for b in blobs])
    x = torch.from_numpy(((imgs.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        emb = (net(x) + net(torch.flip(x, dims=[3]))).numpy()
    acc, std = kfold_accuracy(emb[0::2], emb[1::2], issame)
    assert res["sets"]["tiny"]["accuracy"] == pytest.approx(acc)
    assert res["sets"]["tiny"]["accuracy_std"] == pytest.approx(std)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in out.err
    else:
        assert list((tmp / "out").glob("*_roc.png"))


def test_checkpoint_dict_and_module_prefix(tiny_setup, tmp_path):
    tmp, net, _ = tiny_setup
    sd = net.state_dict()
    torch.save({"backbone": {f"module.{k}": v for k, v in sd.items()}, "step": 3},
               tmp_path / "ckpt.pt")
    got = load_state_dict(tmp_path / "ckpt.pt")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_cli_errors(tiny_setup, tmp_path):
    tmp, _, _ = tiny_setup
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        main(["--weights", str(tmp_path / "missing.pth"), "--data", str(tmp / "bins.yaml"),
              "--device", "cpu"])
    with pytest.raises(ValueError, match="does not match --model mobilefacenet --embedding-size 64"):
        main(["--weights", str(tmp / "weights.pth"), "--data", str(tmp / "bins.yaml"),
              "--model", "mobilefacenet", "--embedding-size", "64", "--model-kwargs", SMALL_MBF,
              "--device", "cpu"])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not a dict
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(tmp_path / "module.pth")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        main(["--weights", str(tmp / "weights.pth"), "--data", str(tmp / "bins.yaml"),
              "--model", "mobilefacenet", "--embedding-size", "32", "--model-kwargs", SMALL_MBF,
              "--device", "cpu", "names=[nope]"])


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--weights" in capsys.readouterr().out


def test_cli_ijb_tables_and_cache(tiny_setup, ijb_tree, capsys):
    tmp, _, _ = tiny_setup
    args = ["--weights", str(tmp / "weights.pth"), "--data", "configs/data/ijbc.yaml",
            "--model", "mobilefacenet", "--embedding-size", "32", "--model-kwargs", SMALL_MBF,
            "--device", "cpu", "--no-progress", f"root={ijb_tree.root}",
            f"output_dir={ijb_tree.out}", "batch_size=64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "IJBC 1:1 TAR (%) at FAR" in out and "TPIR@FPIR=0.01" in out
    assert re.search(r"\|\s+mean \|", out) and re.search(r"\|\s+ijbc-insightface \|", out)
    res = json.loads(next(ijb_tree.out.glob("ijbc_weights_*.json")).read_text())
    assert res["score_weighting"] is True and res["variant"] == "insightface"
    assert set(res["identification_1n"]) == {"G1", "G2", "mean"}
    assert len(list((ijb_tree.out / "features").glob("*.npy"))) == 1
    assert main(args) == 0  # second run: features come from the cache
    assert "features from cache" in capsys.readouterr().out
