"""Teacher modes: EMA direction and initialisation, frozen stays put, live follows, no leaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visual_opsd.teacher import Teacher


def make_student() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # a non-trainable parameter is shared, never shadowed
    return model


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(5, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_ema_first_use_equals_initial_weights():
    student = make_student()
    x = torch.randn(3, 4)
    before = student(x).detach()
    teacher = Teacher(student, "ema", decay=0.9)
    with teacher.weights() as m:
        assert torch.equal(m(x), before)


def test_ema_update_keeps_decay_of_the_old_weights():
    student = make_student()
    teacher = Teacher(student, "ema", decay=0.9)
    old = teacher.state_dict()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    train_step(student, opt)
    teacher.update()
    for name, p in student.named_parameters():
        if name in old:
            expected = 0.9 * old[name] + 0.1 * p.detach()
            torch.testing.assert_close(teacher.shadow[name], expected, rtol=0, atol=1e-7)
    assert "0.bias" not in teacher.shadow


def test_swap_restores_student_and_gives_no_grad():
    student = make_student()
    teacher = Teacher(student, "frozen")
    initial = student[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    train_step(student, opt)
    trained = {n: p.detach().clone() for n, p in student.named_parameters()}
    x = torch.randn(3, 4)
    with teacher.weights() as m:
        out = m(x)
        assert not out.requires_grad
        assert torch.equal(m[0].weight, initial)
    for n, p in student.named_parameters():
        assert torch.equal(p, trained[n])
    # the teacher's view survives a swap round trip unchanged (frozen never moves)
    teacher.update()
    with teacher.weights() as m:
        assert torch.equal(m(x), out)


def test_swap_is_undone_when_the_block_raises():
    student = make_student()
    teacher = Teacher(student, "frozen")
    with torch.no_grad():
        student[2].weight.add_(1.0)
    live = student[2].weight.detach().clone()
    with pytest.raises(RuntimeError), teacher.weights():
        raise RuntimeError("boom")
    assert torch.equal(student[2].weight, live)


def test_live_teacher_is_the_student_under_no_grad():
    student = make_student()
    teacher = Teacher(student, "live")
    assert teacher.shadow == {} and teacher.state_dict() == {}
    with teacher.weights() as m:
        assert m is student and not torch.is_grad_enabled()


def test_state_round_trip_and_mismatch():
    student = make_student()
    teacher = Teacher(student, "ema")
    state = {k: v + 1 for k, v in teacher.state_dict().items()}
    teacher.load_state_dict(state)
    assert torch.equal(teacher.shadow["2.weight"], state["2.weight"])
    with pytest.raises(ValueError, match="missing"):
        teacher.load_state_dict({})


def test_bad_arguments():
    with pytest.raises(ValueError, match="teacher.mode"):
        Teacher(make_student(), "copy")
    with pytest.raises(ValueError, match="ema_decay"):
        Teacher(make_student(), "ema", decay=1.5)
