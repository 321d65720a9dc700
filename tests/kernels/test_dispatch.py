"""Backend choice (style guide B4): reference | auto | triton, the interpreter, errors and the log line."""

from __future__ import annotations

import logging
import types

import pytest
import torch

import ibot_kernels
from ibot_kernels import dispatch
from ibot_kernels.dispatch import force_backend, use_triton

FAKE_TRITON_MODULE = types.ModuleType("fake_triton_module")  # stands for an importable kernels.<op>.triton


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.usefixtures("no_interpreter")
def test_auto_on_cpu_without_interpreter_picks_reference() -> None:
    with force_backend("auto"):
        assert not use_triton("op", FAKE_TRITON_MODULE, torch.zeros(2))


@pytest.mark.usefixtures("no_interpreter")
def test_forced_triton_on_cpu_without_interpreter_raises() -> None:
    with force_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton("op", FAKE_TRITON_MODULE, torch.zeros(2))


def test_forced_triton_without_triton_installed_raises() -> None:
    with force_backend("triton"), pytest.raises(RuntimeError, match="not installed"):
        use_triton("op", None, torch.zeros(2))


def test_auto_without_triton_installed_picks_reference() -> None:
    with force_backend("auto"):
        assert not use_triton("op", None, torch.zeros(2))


def test_reference_never_picks_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with force_backend("reference"):
        assert not use_triton("op", FAKE_TRITON_MODULE, torch.zeros(2))


def test_interpreter_runs_triton_on_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with force_backend("auto"):
        assert use_triton("op", FAKE_TRITON_MODULE, torch.zeros(2))
    with force_backend("triton"):
        assert use_triton("op", FAKE_TRITON_MODULE, torch.zeros(2))


def test_force_backend_restores_and_validates() -> None:
    before = ibot_kernels.current_backend()
    with force_backend("reference"):
        assert ibot_kernels.current_backend() == "reference"
    assert ibot_kernels.current_backend() == before
    with pytest.raises(ValueError, match="not one of"), force_backend("cuda"):
        pass


@pytest.mark.parametrize(("value", "expected"), [("", "auto"), ("Triton", "triton"), (" reference ", "reference")])
def test_env_variable_is_parsed(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("IBOT_KERNELS", value)
    assert dispatch._read_env() == expected


def test_env_variable_rejects_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IBOT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="IBOT_KERNELS"):
        dispatch._read_env()


@pytest.mark.usefixtures("no_interpreter")
def test_choice_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="ibot_kernels.dispatch"), force_backend("auto"):
        for _ in range(3):
            use_triton("some_op", FAKE_TRITON_MODULE, torch.zeros(2))
    assert [r.getMessage() for r in caplog.records] == ["kernels: some_op uses the reference backend"]


@pytest.mark.usefixtures("no_interpreter")
def test_public_ops_fall_back_on_cpu_and_raise_when_forced() -> None:
    student, teacher, center = torch.randn(3, 10), torch.randn(3, 10), torch.zeros(10)
    with force_backend("auto"):
        ce = ibot_kernels.centered_softmax_cross_entropy(student, teacher, center, 0.1, 0.04)
        ibot_kernels.ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5)
    assert ce.shape == (3,)
    with force_backend("triton"):
        with pytest.raises(RuntimeError, match="centered_softmax_cross_entropy"):
            ibot_kernels.centered_softmax_cross_entropy(student, teacher, center, 0.1, 0.04)
        with pytest.raises(RuntimeError, match="ema_update_"):
            ibot_kernels.ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5)


@pytest.mark.interpreter
def test_public_ce_dispatches_to_triton_under_interpreter(triton_device: str) -> None:
    from ibot_kernels.ibot_ce import triton as ce_triton

    student = torch.randn(3, 10, device=triton_device)
    calls = []
    original = ce_triton.centered_softmax_cross_entropy

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, force_backend("auto"):
        mp.setattr(ce_triton, "centered_softmax_cross_entropy", spy)
        ibot_kernels.centered_softmax_cross_entropy(student, student, torch.zeros(10, device=triton_device), 0.1, 0.04)
    assert len(calls) == 1
