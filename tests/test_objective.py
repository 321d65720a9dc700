"""`ibot_loss` against a literal port of the official `iBOTLoss.forward` / `update_center` (bytedance/ibot
main_ibot.py), plus centring and Sinkhorn checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ibot_engine.objective import ibot_loss, masked_token_weights, sinkhorn_log_targets, update_centers_


def official_ibot_loss(student_output, teacher_output, student_local_cls, student_mask, center, center2,
                       temp, temp2, student_temp, ngcrops, ncrops, lambda1=1.0, lambda2=1.0):
    """Literal port of bytedance/ibot main_ibot.py iBOTLoss.forward (schedules replaced by the temperatures)."""
    student_cls, student_patch = student_output
    teacher_cls, teacher_patch = teacher_output

    if student_local_cls is not None:
        student_cls = torch.cat([student_cls, student_local_cls])

    student_cls = student_cls / student_temp
    student_cls_c = student_cls.chunk(ncrops)
    student_patch = student_patch / student_temp
    student_patch_c = student_patch.chunk(ngcrops)

    teacher_cls_c = F.softmax((teacher_cls - center) / temp, dim=-1)
    teacher_cls_c = teacher_cls_c.detach().chunk(ngcrops)
    teacher_patch_c = F.softmax((teacher_patch - center2) / temp2, dim=-1)
    teacher_patch_c = teacher_patch_c.detach().chunk(ngcrops)

    total_loss1, n_loss_terms1 = 0, 0
    total_loss2, n_loss_terms2 = 0, 0
    for q in range(len(teacher_cls_c)):
        for v in range(len(student_cls_c)):
            if v == q:
                loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                mask = student_mask[v].flatten(-2, -1)
                loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                total_loss2 += loss2.mean()
                n_loss_terms2 += 1
            else:
                loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], dim=-1), dim=-1)
                total_loss1 += loss1.mean()
                n_loss_terms1 += 1

    total_loss1 = total_loss1 / n_loss_terms1 * lambda1
    total_loss2 = total_loss2 / n_loss_terms2 * lambda2
    return dict(cls=total_loss1, patch=total_loss2, loss=total_loss1 + total_loss2)  # noqa: C408 (literal port)


def official_update_center(center, center2, teacher_cls, teacher_patch, momentum, world_size=1):
    """Literal port of iBOTLoss.update_center at world size 1 (dist.all_reduce is the identity)."""
    cls_center = torch.sum(teacher_cls, dim=0, keepdim=True)
    cls_center = cls_center / (len(teacher_cls) * world_size)
    center = center * momentum + cls_center * (1 - momentum)
    patch_center = torch.sum(teacher_patch.mean(1), dim=0, keepdim=True)
    patch_center = patch_center / (len(teacher_patch) * world_size)
    center2 = center2 * momentum + patch_center * (1 - momentum)
    return center, center2


def _random_case(B, L, K, h, w, seed, empty_images=()):
    g = torch.Generator().manual_seed(seed)
    G, N = 2, h * w
    s_global_cls = torch.randn(G * B, K, generator=g) * 3
    s_local_cls = torch.randn(L * B, K, generator=g) * 3 if L else None
    s_patch_full = torch.randn(G * B, N, K, generator=g) * 3
    t_cls = torch.randn(G * B, K, generator=g) * 3
    t_patch_full = torch.randn(G * B, N, K, generator=g) * 3
    mask = torch.rand(G * B, h, w, generator=g) < 0.4
    for i in empty_images:
        mask[i] = False
    center = torch.randn(1, K, generator=g) * 0.5
    center2 = torch.randn(1, 1, K, generator=g) * 0.5
    return s_global_cls, s_local_cls, s_patch_full, t_cls, t_patch_full, mask, center, center2


@pytest.mark.parametrize(
    ("B", "L", "K", "empty"),
    [(1, 0, 5, ()), (3, 2, 17, (0,)), (4, 10, 64, (1, 2, 5)), (2, 4, 1000, (0, 1, 2, 3))],
)
@pytest.mark.parametrize("temps", [(0.04, 0.07, 0.1), (0.07, 0.04, 0.2)])
def test_ibot_loss_equals_official_port(B, L, K, empty, temps):
    h, w = 3, 4
    s_g, s_l, s_patch_full, t_cls, t_patch_full, mask, center, center2 = _random_case(B, L, K, h, w, B * 100 + L,
                                                                                        empty)
    temp, temp2, student_temp = temps
    G = 2
    expected = official_ibot_loss(
        (s_g, s_patch_full), (t_cls, t_patch_full), s_l, mask.chunk(G), center, center2,
        temp, temp2, student_temp, ngcrops=G, ncrops=G + L,
    )
    flat = mask.flatten()
    s_cls = torch.cat([s_g, s_l]) if s_l is not None else s_g
    got = ibot_loss(
        s_cls, t_cls, s_patch_full.reshape(-1, K)[flat], t_patch_full.reshape(-1, K)[flat], mask,
        center.reshape(K), center2.reshape(K), temp, temp2, student_temp,
    )
    torch.testing.assert_close(got.cls, expected["cls"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.patch, expected["patch"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.total, expected["loss"], atol=1e-6, rtol=1e-6)


def test_ibot_loss_gradients_match_official_port():
    B, L, K, h, w = 3, 2, 33, 2, 3
    s_g, s_l, s_patch_full, t_cls, t_patch_full, mask, center, center2 = _random_case(B, L, K, h, w, 7, (2,))
    flat = mask.flatten()
    s_cls = torch.cat([s_g, s_l]).requires_grad_()
    s_patch = s_patch_full.clone().requires_grad_()
    expected = official_ibot_loss(
        (s_cls[: 2 * B], s_patch), (t_cls, t_patch_full), s_cls[2 * B :], mask.chunk(2), center, center2,
        0.05, 0.06, 0.1, ngcrops=2, ncrops=2 + L,
    )["loss"]
    g_cls_ref, g_patch_ref = torch.autograd.grad(expected, [s_cls, s_patch])
    got = ibot_loss(s_cls, t_cls, s_patch.reshape(-1, K)[flat], t_patch_full.reshape(-1, K)[flat], mask,
                    center.reshape(K), center2.reshape(K), 0.05, 0.06, 0.1).total
    g_cls, g_patch = torch.autograd.grad(got, [s_cls, s_patch])
    torch.testing.assert_close(g_cls, g_cls_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_patch, g_patch_ref, atol=1e-6, rtol=1e-5)


def test_lambda_weights_and_no_masked_tokens():
    B, K = 2, 8
    mask = torch.zeros(2 * B, 2, 2, dtype=torch.bool)
    s_cls, t_cls = torch.randn(2 * B, K), torch.randn(2 * B, K)
    empty = torch.zeros(0, K)
    out = ibot_loss(s_cls, t_cls, empty, empty, mask, torch.zeros(K), torch.zeros(K), 0.04, 0.04,
                    lambda_cls=0.5, lambda_patch=2.0)
    assert out.patch.item() == 0.0
    torch.testing.assert_close(out.total, 0.5 * out.cls)


def test_masked_token_weights():
    mask = torch.tensor([[[1, 1], [0, 1]], [[0, 0], [0, 0]], [[0, 1], [0, 0]]], dtype=torch.bool)
    w = masked_token_weights(mask, int(mask.sum()))
    torch.testing.assert_close(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_global"):
        ibot_loss(torch.randn(6, 4), torch.randn(3, 4), torch.randn(0, 4), torch.randn(0, 4),
                  torch.zeros(3, 2, 2, dtype=torch.bool), torch.zeros(4), torch.zeros(4), 0.04, 0.04)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_center_update_matches_official_port(momentum):
    B, K, N = 3, 11, 6
    t_cls, t_patch = torch.randn(2 * B, K), torch.randn(2 * B, N, K)
    center, center2 = torch.randn(1, K), torch.randn(1, 1, K)
    exp_c, exp_c2 = official_update_center(center, center2, t_cls, t_patch, momentum)
    c, c2 = center.reshape(K).clone(), center2.reshape(K).clone()
    update_centers_(c, c2, t_cls, t_patch.reshape(-1, K).sum(0), 2 * B * N, momentum)
    torch.testing.assert_close(c, exp_c.reshape(K))
    torch.testing.assert_close(c2, exp_c2.reshape(K))


def test_center_update_keeps_patch_center_without_tokens():
    c, c2 = torch.zeros(4), torch.ones(4)
    update_centers_(c, c2, torch.ones(2, 4), torch.zeros(4), 0, 0.9)
    torch.testing.assert_close(c2, torch.ones(4))
    torch.testing.assert_close(c, torch.full((4,), 0.1))


def test_sinkhorn_targets_are_balanced_distributions():
    logits = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    log_q = sinkhorn_log_targets(logits, 0.1, num_iters=50)
    q = log_q.exp()
    torch.testing.assert_close(q.sum(1), torch.ones(64), atol=1e-5, rtol=0)
    # columns (prototypes) get equal mass: each 64 / 16 rows' worth
    torch.testing.assert_close(q.sum(0), torch.full((16,), 4.0), atol=1e-3, rtol=1e-3)
    # softmax(log q) == q: the kernel with centre 0 and temperature 1 sees exactly these targets
    torch.testing.assert_close(torch.softmax(log_q, -1), q, atol=1e-6, rtol=1e-5)
