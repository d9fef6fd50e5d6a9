"""The precision policy: how ``"auto"`` resolves, and the chunked twin in every precision."""
# B: batch, C: classes (local shard), D: embedding dim
import pytest
import torch
import torch.nn.functional as F
from unpg.kernels import lse_and_target, resolve_precision
from unpg.kernels.precision import round_tf32

SCALE = 64.0


@pytest.fixture
def fp32_flags():
    """Restore torch's global fp32 matmul settings after a test changes them."""
    allow, prec = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.set_float32_matmul_precision(prec)


def test_auto_follows_dtype_autocast_and_tf32_flags(fp32_flags):
    x32 = torch.randn(2, 4)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    assert resolve_precision("auto", x32) == "ieee"
    assert resolve_precision("auto", x32.bfloat16()) == "bf16"
    assert resolve_precision("auto", x32.half()) == "fp16"
    assert resolve_precision("auto", x32.double()) == "ieee"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_precision("auto", x32) == "bf16"
        assert resolve_precision("auto", x32.double()) == "ieee"
    torch.set_float32_matmul_precision("high")
    assert resolve_precision("auto", x32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = True
    assert resolve_precision("auto", x32) == "tf32"
    for explicit in ("bf16", "fp16", "tf32", "ieee"):
        assert resolve_precision(explicit, x32.bfloat16()) == explicit
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", x32)


def test_round_tf32_keeps_ten_mantissa_bits_ties_away():
    one_ulp = 2.0 ** -10
    x = torch.tensor([1.0 + one_ulp / 2, -(1.0 + one_ulp / 2), 1.0 + one_ulp / 4, 3.0])
    torch.testing.assert_close(round_tf32(x), torch.tensor([1.0 + one_ulp, -(1.0 + one_ulp),
                                                            1.0, 3.0]), rtol=0, atol=0)
    y = torch.randn(1000)
    rel = ((round_tf32(y) - y).abs() / y.abs()).max().item()
    assert 0 < rel <= 2.0 ** -11


@pytest.mark.parametrize("precision,same", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                            ("tf32", "tf32"), ("ieee", torch.float32)])
def test_chunked_fp32_master_weight_within_rule(kcheck, precision, same):
    x, w, labels = kcheck.inputs(16, 130, 32, torch.float32, seed=31, class_start=9,
                                 label_span=(0, 150))

    def fn(x, w, labels):
        return lse_and_target(x, w, labels, SCALE, backend="chunked", precision=precision,
                              chunk_size=48, class_start=9)

    kcheck.rule(fn, x, w, labels, SCALE, class_start=9, with_target=True, same_dtype=same)


def test_chunked_bf16_tiles_are_rounded_weight_over_fp32_norm():
    # What "bf16 tiles from the fp32 master weight" means, against a float64 computation.
    gen = torch.Generator().manual_seed(32)
    x = F.normalize(torch.randn(10, 24, generator=gen), dim=1)
    w = torch.randn(70, 24, generator=gen)
    labels = torch.randint(0, 70, (10,), generator=gen)
    ell = lse_and_target(x, w, labels, SCALE, backend="chunked", precision="bf16")[0]
    r = x.bfloat16().double() @ w.bfloat16().double().t()
    logits = SCALE * r / w.double().norm(dim=1)
    logits[torch.arange(10), labels] = float("-inf")
    torch.testing.assert_close(ell.double(), torch.logsumexp(logits, dim=1), rtol=1e-6,
                               atol=1e-5)
    ieee = lse_and_target(x, w, labels, SCALE, backend="chunked", precision="ieee")[0]
    assert (ell - ieee).abs().max() > 1e-3  # the rounding is really there


def test_autocast_on_cpu_selects_low_precision_tiles():
    gen = torch.Generator().manual_seed(33)
    x = F.normalize(torch.randn(8, 16, generator=gen), dim=1)
    w = torch.randn(40, 16, generator=gen)
    labels = torch.randint(0, 40, (8,), generator=gen)
    explicit = lse_and_target(x, w, labels, SCALE, backend="chunked", precision="bf16")[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lse_and_target(x, w, labels, SCALE, backend="chunked")[0]
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)
