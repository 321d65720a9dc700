"""`ibot bench` and `ibot profile` on CPU with a tiny config: files and fields, the FLOP count of one real step
against an analytic count, the largest-batch search, the lightly comparison, and the kernel-category classifier."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ibot_engine.bench.harness import build_harness, find_max_batch
from ibot_engine.bench.profile import CATEGORIES, classify
from ibot_engine.bench.timing import count_flops
from ibot_engine.cli import main
from ibot_engine.config import load_config
from ibot_engine.configs import DEMO_CONFIG
from ibot_engine.distributed import DistEnv
from ibot_engine.model.vit import ARCHS

DEMO = str(DEMO_CONFIG)
# vit_tiny, patch 8, 2 x 32 px + 2 x 16 px crops, K = 64, a small head, batch 2.
TINY = ["train.batch_size=2", "model.out_dim=64", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
        "data.num_local=2"]

try:
    import lightly  # noqa: F401
    import timm  # noqa: F401

    HAVE_LIGHTLY = True
except ImportError:
    HAVE_LIGHTLY = False


def _finite_positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(row[key], int | float) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])


def test_bench_writes_report_and_finds_max_batch(tmp_path):
    out = tmp_path / "bench.md"
    rc = main(["bench", "--config", DEMO, *TINY, "--steps", "2", "--warmup", "1", "--find-max-batch",
               "--max-batch", "3", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    for needle in ("| card |", "| torch |", "| triton |", "| python |", "| date |", "ibot bench --config",
                   "--max-batch 3", "| model.arch | vit_tiny |", "| model.out_dim (K) | 64 |", "| ibot-engine | 2 |"):
        assert needle in text, needle
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["config"]["model"]["patch_size"] == 8 and data["environment"]["torch"] == torch.__version__
    (row,) = data["rows"]
    assert row["batch_size"] == 2 and row["steps"] == 2
    _finite_positive(row, "img_per_s", "step_ms_median", "step_ms_min", "step_ms_max", "peak_memory_gib",
                     "flops_per_step", "gflop_per_img", "achieved_tflops")
    assert row["step_ms_min"] <= row["step_ms_median"] <= row["step_ms_max"]
    assert 0 <= row["data_wait_share"] < 1
    assert row["mfu"] is None  # CPU without --peak-tflops
    assert data["peak_source"] == "none (CPU)" and data["measured_gemm_tflops (float32 8192^3)"] is None
    assert data["largest_batch_ibot_engine"] == 3  # nothing runs out of memory on CPU: the cap


def test_bench_data_stream_measures_data_wait(tmp_path):
    out = tmp_path / "data.md"
    assert main(["bench", "--config", DEMO, *TINY, "data.num_workers=0", "data.builtin_size=16", "--data",
                 "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["data"].startswith("configured data stream")
    # Decoding and augmenting in this process (0 workers) takes measurable time before every step.
    assert 0 < data["rows"][0]["data_wait_share"] < 1


def _analytic_step_flops(cfg, num_masked: int) -> int:
    """Matmul FLOPs of one iBOT step written out from the model's definition (FlopCounterMode's conventions:
    2 FLOPs per multiply-add, SDPA backward = 5 score-sized matmuls, no gradient for the input images)."""
    a, m, d = ARCHS[cfg.model.arch], cfg.model, cfg.data
    D, depth, p, B = a.embed_dim, a.depth, m.patch_size, cfg.train.batch_size
    hidden = int(D * a.mlp_ratio)
    Ng, Nl, N0 = (d.global_size // p) ** 2, (d.local_size // p) ** 2, (m.img_size // p) ** 2
    assert d.global_size == m.img_size  # global crops use the stored position embedding: no resampling matmul
    Tg, Tl = Ng + 1, Nl + 1

    def block_fwd(T: int) -> int:  # qkv, proj, fc1, fc2 and the two attention matmuls, one sequence
        return depth * (2 * T * D * (3 * D + D + 2 * hidden) + 2 * 2 * T * T * D)

    def block_bwd(T: int) -> int:
        return depth * (2 * 2 * T * D * (3 * D + D + 2 * hidden) + 5 * 2 * T * T * D)

    def conv(N: int) -> int:
        return 2 * N * D * 3 * p * p

    def head(rows: int) -> int:
        return 2 * rows * (D * m.head_hidden_dim + m.head_hidden_dim ** 2 + m.head_hidden_dim * m.head_bottleneck_dim
                           + m.head_bottleneck_dim * m.out_dim)

    G, L = d.num_global, d.num_local
    teacher = G * B * (block_fwd(Tg) + conv(Ng)) + head(G * B * Tg)  # head on every teacher token (patch_center all)
    student_fwd = G * B * (block_fwd(Tg) + conv(Ng)) + L * B * (block_fwd(Tl) + conv(Nl)) + 2 * Nl * N0 * D
    student_bwd = (G * B * (block_bwd(Tg) + conv(Ng)) + L * B * (block_bwd(Tl) + conv(Nl))  # conv: weight grad only
                   + 2 * Nl * N0 * D)  # resampled position embedding: gradient of the embedding only
    student_head = 3 * head((G + L) * B + num_masked)  # forward + input and weight gradients
    return teacher + student_fwd + student_bwd + student_head


def test_step_flops_match_analytic_count():
    cfg = load_config(DEMO, [*TINY, "loss.patch_center=all"])
    h = build_harness(cfg, DistEnv(0, 1, 0, torch.device("cpu")), num_batches=1)
    batch = h.batches[0]
    counted = count_flops(lambda: h.step(batch, 0))
    expected = _analytic_step_flops(cfg, batch.mask_indices.numel())
    assert batch.mask_indices.numel() > 0
    # The same conventions give the same integer; 0.2% leaves room for a rounding-sized difference only (without
    # the CPU SDPA formula that ibot_engine.bench.timing registers, the count is 1.4% short and this fails).
    assert abs(counted - expected) <= 0.002 * expected, (counted, expected)


@pytest.mark.parametrize(("start", "fits_up_to", "cap"), [
    (64, 200, None), (64, 64, None), (64, 1000, 300), (64, 10, None), (1, 1, None), (8, 0, None), (3, 1000, 3),
])
def test_find_max_batch_search(start, fits_up_to, cap):
    tried = []

    def try_batch(b: int) -> None:
        tried.append(b)
        if b > fits_up_to:
            raise torch.OutOfMemoryError(f"batch {b} does not fit")

    assert find_max_batch(try_batch, start, cap) == min(fits_up_to, cap or fits_up_to)
    assert len(tried) <= 2 * math.log2(max(fits_up_to, start, 2)) + 3  # doubling then bisection, not a scan
    assert cap is None or max(tried) <= cap


def test_find_max_batch_lets_other_errors_through():
    def try_batch(b: int) -> None:
        raise ValueError("not an OOM")

    with pytest.raises(ValueError, match="not an OOM"):
        find_max_batch(try_batch, 4)


@pytest.mark.skipif(not HAVE_LIGHTLY, reason="lightly / timm not installed (pip install 'ibot-engine[bench]')")
def test_bench_compare_lightly(tmp_path):
    out = tmp_path / "cmp.md"
    assert main(["bench", "--config", DEMO, *TINY, "--steps", "2", "--warmup", "1", "--compare", "lightly",
                 "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    ours, theirs = data["rows"]
    assert theirs["name"].startswith("lightly") and theirs["batch_size"] == ours["batch_size"] == 2
    _finite_positive(theirs, "img_per_s", "step_ms_median", "flops_per_step", "gflop_per_img")
    assert data["ratio_img_per_s (ours / lightly)"] == pytest.approx(ours["img_per_s"] / theirs["img_per_s"],
                                                                     rel=1e-2)
    # Same crops, K and head widths: both steps are of the same size (timm's ViT adds no matmul of note; the
    # lightly example runs its teacher head on masked tokens only, ours on every token for the official centre).
    assert 0.5 < theirs["gflop_per_img"] / ours["gflop_per_img"] < 2
    assert "lightly 1.6 (best form)" in out.read_text()


def test_compare_lightly_missing_fails_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightly", None)  # import lightly -> ImportError
    out = tmp_path / "none.md"
    assert main(["bench", "--config", DEMO, *TINY, "--compare", "lightly", "--out", str(out)]) == 2
    assert "pip install 'ibot-engine[bench]'" in capsys.readouterr().err
    assert not out.exists()


def test_profile_writes_traces_and_summary(tmp_path):
    out = tmp_path / "prof"
    assert main(["profile", "--config", DEMO, *TINY, "train.batch_size=1", "--wait", "0", "--warmup", "1",
                 "--active", "1", "--out", str(out)]) == 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["traceEvents"]
    assert list((out / "tb").glob("*.pt.trace.json*"))
    summary = (out / "summary.md").read_text()
    for category in CATEGORIES:
        assert f"| {category} |" in summary, category
    assert "## Top 20" in summary and ("`aten::mm`" in summary or "`aten::addmm`" in summary)
    assert "no CUDA memory snapshot" in summary and not (out / "memory_snapshot.pickle").exists()
    gemm = next(line for line in summary.splitlines() if line.startswith("| gemm |"))
    assert float(gemm.split("|")[2]) > 0


@pytest.mark.parametrize(("name", "context", "expected"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     (), "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>", (), "gemm"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", (), "gemm"),
    ("aten::mm", (), "gemm"),
    ("aten::addmm", ("aten::linear",), "gemm"),
    ("aten::convolution_backward", (), "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, false>", (), "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0 fmha", (), "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", (), "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", (), "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", (), "attention"),
    ("_ce_fwd_kernel", ("ibot::centered_softmax_ce_fwd",), "loss"),
    ("aten::_log_softmax", (), "loss"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", (), "loss"),
    ("_ema_kernel", ("ibot.step", "ibot.ema"), "ema"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<3>, TernaryOpScalarFunctor<float>>",
     ("ibot.step", "ibot.ema", "aten::_foreach_lerp_"), "ema"),
    ("aten::lerp_", ("aten::_foreach_lerp_",), "ema"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     ("Optimizer.step#AdamW.step", "aten::_fused_adamw_"), "optimizer"),
    ("aten::_fused_adamw_", (), "optimizer"),
    ("FusedAdam", (), "optimizer"),
    ("aten::mul_", ("aten::_foreach_norm",), "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", (), "communication"),
    ("ncclKernel_AllReduce_RING_LL_Sum_float", (), "communication"),
    ("gloo:all_reduce", (), "communication"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", ("aten::gelu",),
     "elementwise/norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", (), "elementwise/norm"),
    ("triton_poi_fused_add_native_layer_norm_0", (), "elementwise/norm"),
    ("aten::native_layer_norm", (), "elementwise/norm"),
    ("aten::add", (), "elementwise/norm"),
    ("Memcpy HtoD (Pinned -> Device)", ("ibot.data", "aten::to", "aten::copy_"), "data"),
    ("ibot.data", (), "data"),
    ("aten::view", (), "other"),
    ("Memset (Device)", (), "other"),
    ("ibot.step", (), "other"),
])
def test_classify(name, context, expected):
    assert classify(name, context) == expected


def _event(id_, name, device_type, parent=None, us=0.0, linked=0, annotation=False, self_cpu=0.0):
    from types import SimpleNamespace

    return SimpleNamespace(id=id_, name=name, device_type=device_type, cpu_parent=parent, is_async=False,
                           linked_correlation_id=linked, is_user_annotation=annotation,
                           self_cpu_time_total=self_cpu, time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_kernel_times_device_branch_uses_launch_context():
    """The CUDA branch of the table (no GPU here): kernels take their launching op's ranges as context, and the
    GPU-timeline copies of record_function ranges are not counted as kernels."""
    from torch.autograd import DeviceType

    from ibot_engine.bench.profile import kernel_times

    step = _event(1, "ibot.step", DeviceType.CPU)
    ema = _event(2, "ibot.ema", DeviceType.CPU, parent=step)
    lerp = _event(3, "aten::_foreach_lerp_", DeviceType.CPU, parent=ema)
    opt = _event(4, "Optimizer.step#AdamW.step", DeviceType.CPU, parent=step)
    adam = _event(5, "aten::_fused_adamw_", DeviceType.CPU, parent=opt)
    events = [step, ema, lerp, opt, adam,
              _event(10, "void at::native::multi_tensor_apply_kernel<TernaryOpScalarFunctor>", DeviceType.CUDA,
                     us=30.0, linked=3),
              _event(11, "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", DeviceType.CUDA,
                     us=50.0, linked=5),
              _event(12, "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", DeviceType.CUDA,
                     us=50.0, linked=5),
              _event(13, "ibot.step", DeviceType.CUDA, us=1000.0, annotation=True)]
    rows = {(r.name.split("<")[1].rstrip(">"), r.category): (r.calls, r.time_us) for r in kernel_times(events, True)}
    assert rows == {("TernaryOpScalarFunctor", "ema"): (1, 30.0), ("FusedAdamMathFunctor", "optimizer"): (2, 100.0)}


@pytest.mark.parametrize(("card", "precision", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0), ("NVIDIA H100 80GB HBM3", "fp32", 66.9), ("Tesla T4", "fp16", None),
])
def test_peak_flops_table(monkeypatch, card, precision, tflops):
    from ibot_engine.bench.timing import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card)
    peak = peak_flops(torch.device("cuda", 0), precision)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "bf16") is None
    assert peak_flops(cpu, "fp32", override_tflops=2.0) == 2e12
    from ibot_engine.bench.timing import peak_source

    source = peak_source(torch.device("cuda", 0))
    assert (card in source) if tflops is not None else ("not in PEAK_TFLOPS" in source)


@pytest.mark.parametrize("part", ["quick", "more1", "more2", "more3"])
def test_gpu_check_parts_fit_one_device_call(part):
    """`benchmarks/gpu_check.sh PART --dry-run` lists each step with its timeout and files and ends with the
    totals: each part fits an 8-minute call and the 8 files the device tool brings back (`quick` is the one call
    a session's device time allows)."""
    import re
    import subprocess

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    out = subprocess.run(["bash", str(script), part, "--dry-run"], capture_output=True, text=True, check=True).stdout
    total = re.fullmatch(r"total: (\d+) s, (\d+) files", out.strip().splitlines()[-1])
    assert total, out
    seconds, files = int(total[1]), int(total[2])
    assert seconds <= 480 and files <= 8
    steps = re.findall(r"^(\S+)\s+(\d+) s  writes: ", out, flags=re.M)
    assert steps and sum(int(s) for _, s in steps) == seconds
