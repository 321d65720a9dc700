"""Attention backends and crop packing against the default SDPA path: outputs and gradients.

Every backend that runs on this machine is compared with `model.attention=sdpa` (auto kernel), unpacked. FlexAttention
has no CPU backward (torch 2.14), so on CPU its forward is compared and its gradients only on CUDA; xformers has no
CPU operator at all, so its comparison needs CUDA and a matching xformers build.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ibot_engine.config import ConfigError, load_config
from ibot_engine.model.attention import Packing, check_attention, make_packing
from ibot_engine.model.ibot import IBOTNetwork
from ibot_engine.model.vit import VisionTransformer, drop_path
from tests.helpers import tiny_config

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _vit(attention: str = "sdpa", sdpa_backend: str = "auto", device: str = "cpu",
         dtype: torch.dtype = torch.float32) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, mask_token=True, attention=attention,
                            sdpa_backend=sdpa_backend)
    return vit.to(device=device, dtype=dtype).train()


def _inputs(device: str = "cpu", dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 3, 32, 32, generator=gen).to(device, dtype)
    loc = torch.randn(6, 3, 16, 16, generator=gen).to(device, dtype)
    m = (torch.rand(4, 4, 4, generator=gen) > 0.5).to(device)
    return g, loc, m


def _run(vit: VisionTransformer, packed: bool, grad: bool = True):
    """Tokens of the global (masked) and local crops, and the parameter gradients of a fixed weighted sum."""
    g, loc, m = _inputs(next(vit.parameters()).device, next(vit.parameters()).dtype)
    vit.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        tg, tl = vit.forward_packed([(g, m), (loc, None)]) if packed else (vit(g, m), vit(loc))
        if grad:
            weights = torch.linspace(-1, 1, tg.shape[-1], device=tg.device, dtype=tg.dtype)
            ((tg * weights).sum() + (tl * weights).pow(2).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in vit.named_parameters() if p.grad is not None} if grad else {}
    return tg.detach(), tl.detach(), grads


def _assert_close(a, b, rel: float) -> None:
    """Max abs difference within `rel` times the reference tensor's largest magnitude (kernels reduce in other
    orders, and summed gradients like pos_embed's are large)."""
    (tg_a, tl_a, gr_a), (tg_b, tl_b, gr_b) = a, b
    assert gr_a.keys() == gr_b.keys()
    pairs = {"global tokens": (tg_a, tg_b), "local tokens": (tl_a, tl_b)} | {n: (gr_a[n], gr_b[n]) for n in gr_a}
    for name, (x, y) in pairs.items():
        assert x.shape == y.shape, name
        err, scale = (x.float() - y.float()).abs().max().item(), y.float().abs().max().item()
        assert err <= rel * max(scale, 1e-3), f"{name}: max diff {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("sdpa_backend", ["math", "flash"])
def test_forced_sdpa_kernels_match_the_automatic_choice(sdpa_backend):
    reference = _run(_vit(), packed=False)
    forced = _run(_vit(sdpa_backend=sdpa_backend), packed=False)
    _assert_close(forced, reference, rel=1e-4)
    assert reference[2], "no gradients were compared"


def test_packed_crops_match_separate_passes_outputs_and_gradients():
    reference = _run(_vit(), packed=False)
    packed = _run(_vit(), packed=True)
    _assert_close(packed, reference, rel=1e-4)
    assert len(packed[2]) == sum(1 for _ in _vit().parameters())  # every parameter got its gradient


@pytest.mark.parametrize("packed", [False, True])
def test_flex_forward_matches_sdpa_on_cpu(packed):
    reference = _run(_vit().eval(), packed=False, grad=False)
    flex = _run(_vit("flex").eval(), packed=packed, grad=False)
    _assert_close(flex, reference, rel=1e-4)


def test_flex_backward_is_cuda_only_in_this_torch():
    if CUDA:
        pytest.skip("CUDA present: test_backends_match_sdpa_on_cuda compares flex gradients")
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        _run(_vit("flex"), packed=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "xformers", "sdpa:cudnn", "sdpa:flash", "sdpa:efficient"])
@pytest.mark.parametrize("packed", [False, True])
def test_backends_match_sdpa_on_cuda(backend, packed):
    if not CUDA:
        pytest.skip("needs CUDA")
    attention, _, sdpa_backend = backend.partition(":")
    try:
        check_attention(attention, sdpa_backend or "auto", torch.device("cuda"))
    except (RuntimeError, ValueError) as err:
        pytest.skip(str(err))
    dtype = torch.bfloat16
    reference = _run(_vit(device="cuda", dtype=torch.float32), packed=False)
    reference_bf16 = _run(_vit(device="cuda", dtype=dtype), packed=False)
    other = _run(_vit(attention, sdpa_backend or "auto", device="cuda", dtype=dtype), packed=packed)
    # bf16: within a few times the error of the default backend in bf16, measured against fp32.
    for got, ref, ref16 in zip(other[:2], reference[:2], reference_bf16[:2]):
        assert (got.float() - ref).abs().max() <= 4 * (ref16.float() - ref).abs().max() + 1e-2
    for name, g in other[2].items():
        err16 = (reference_bf16[2][name].float() - reference[2][name]).abs().max()
        assert (g.float() - reference[2][name]).abs().max() <= 4 * err16 + 1e-2, name


def test_xformers_absent_or_without_cpu_operator_is_one_clear_error():
    with pytest.raises((RuntimeError, ValueError), match="xformers"):
        check_attention("xformers", "auto", torch.device("cpu"))


def test_sdpa_kernel_without_cpu_implementation_is_refused_before_work():
    with pytest.raises(ValueError, match=r"model\.sdpa_backend=cudnn"):
        check_attention("sdpa", "cudnn", torch.device("cpu"))
    check_attention("sdpa", "math", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"model\.sdpa_backend"):
        load_config(None, ["model.attention=flex", "model.sdpa_backend=math"])
    with pytest.raises(ConfigError, match=r"model\.drop_path_impl"):
        load_config(None, ["model.pack_crops=true", "model.drop_path_impl=subset"])


def test_packed_drop_path_draws_one_decision_per_crop():
    packing = make_packing(((3, 5), (4, 2)), "sdpa", torch.device("cpu"))
    assert isinstance(packing, Packing) and packing.num_sequences == 7
    x = torch.ones(3 * 5 + 4 * 2, 6)
    torch.manual_seed(3)
    out = drop_path(x, 0.5, True, packing)
    torch.manual_seed(3)
    keep = torch.empty(7).bernoulli_(0.5) / 0.5  # the same stream: one draw per crop, in packing order
    expected = keep.repeat_interleave(torch.tensor([5, 5, 5, 2, 2, 2, 2]))[:, None].expand_as(x)
    torch.testing.assert_close(out, expected)
    assert set(out.unique().tolist()) <= {0.0, 2.0}


def test_student_network_with_packed_crops_equals_unpacked():
    """Through the iBOT network (head, masked-token selection): logits and every gradient agree."""
    def run(pack: bool):
        cfg = tiny_config("model.drop_path=0", f"model.pack_crops={str(pack).lower()}")
        torch.manual_seed(0)
        net = IBOTNetwork(cfg.model, student=True).train()
        g, loc, m = _inputs()
        idx = m.flatten().nonzero().squeeze(1)
        cls, patch, _ = net(g, idx, m, loc)
        (cls.logsumexp(-1).sum() + patch.pow(2).mean()).backward()
        return cls.detach(), patch.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}

    _assert_close(run(True), run(False), rel=1e-4)


def test_attention_benchmark_smoke_run_writes_its_report(tmp_path):
    """`python -m ibot_benchmarks.attention --device cpu --quick` runs every CPU-capable row and names the fastest
    (run as a user runs it: tests import nothing from the benchmarks)."""
    out = tmp_path / "attention.md"
    run = subprocess.run([sys.executable, "-m", "ibot_benchmarks.attention", "--device", "cpu", "--quick",
                          "--no-compile", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = out.read_text()
    assert "| vit_tiny | sdpa:math |" in text and "| vit_tiny | sdpa packed |" in text
    assert "FlexAttention has no CPU backward" in text and "fastest for vit_tiny" in text
