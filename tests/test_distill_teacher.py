"""The frozen teacher: never optimised, never in train mode, refreshed once per round."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mcd_scale.distill.teacher import FrozenTeacher

V = 6


class TinyDenoiser(nn.Module):
    """Embedding -> dropout -> linear, t-conditioned: enough to show dropout and weight copying."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.emb = nn.Embedding(V + 1, 16)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(16, V + 2)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.emb(z))) * self.scale + t.view(-1, 1, 1)


class Trainer(nn.Module):
    """How a training wrapper would hold both: the teacher as a plain attribute."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = FrozenTeacher.clone_of(student)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V + 1, (4, 10), generator=g), torch.rand(4, generator=g)


def test_optimizer_over_the_student_never_sees_the_teacher():
    torch.manual_seed(0)
    trainer = Trainer(TinyDenoiser())
    teacher_ids = {id(p) for p in trainer.teacher.module.parameters()}
    assert not teacher_ids & {id(p) for p in trainer.parameters()}
    assert all(k.startswith("student.") for k in trainer.state_dict())
    assert all(not p.requires_grad for p in trainer.teacher.module.parameters())
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5)
    before = {n: p.clone() for n, p in trainer.teacher.module.named_parameters()}
    z, t = _batch()
    target = torch.log_softmax(trainer.teacher(z, t)[..., :V], -1)  # usable in an autograd loss
    logp = torch.log_softmax(trainer.student(z, t)[..., :V], -1)
    (logp.exp() * (logp - target)).sum().backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in trainer.teacher.module.named_parameters())
    assert not torch.equal(trainer.student.out.weight, trainer.teacher.module.out.weight)
    # the pitfall this guards against: a module attribute IS registered and optimised
    naive = nn.Module()
    naive.teacher = TinyDenoiser()
    assert len(list(naive.parameters())) > 0


def test_dropout_is_off_and_train_mode_is_refused():
    torch.manual_seed(0)
    trainer = Trainer(TinyDenoiser(dropout=0.5))
    trainer.train()  # the usual trainer call: must not reach the teacher
    z, t = _batch()
    a, b = trainer.teacher(z, t), trainer.teacher(z, t)
    assert torch.equal(a, b) and not a.requires_grad
    s1, s2 = trainer.student(z, t), trainer.student(z, t)
    assert not torch.equal(s1, s2)  # the architecture's dropout is live in train mode
    trainer.teacher.module.drop.train()
    with pytest.raises(RuntimeError, match="train mode"):
        trainer.teacher(z, t)


def test_refresh_copies_once_per_round():
    torch.manual_seed(0)
    student = TinyDenoiser()
    teacher = FrozenTeacher(TinyDenoiser(), round=0)
    with torch.no_grad():
        student.scale.fill_(2.0)
    assert teacher.refresh_from(student, round=1) is True
    for (n, p), q in zip(teacher.module.named_parameters(), student.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr() and not p.requires_grad, n
    assert float(teacher.module.scale) == 2.0
    with torch.no_grad():
        student.out.weight.add_(1.0)  # the student trains on within the round
    assert teacher.refresh_from(student, round=1) is False  # another micro-batch of the boundary step
    assert not torch.equal(teacher.module.out.weight, student.out.weight) and teacher.refreshes == 1
    with pytest.raises(ValueError, match="already from round 1"):
        teacher.refresh_from(student, round=0)
    wrapped = nn.Module()
    wrapped.module = student  # the DeepSpeedEngine / DDP naming: 'module.<name>'
    assert teacher.refresh_from(wrapped, round=2) is True
    assert torch.equal(teacher.module.out.weight, student.out.weight) and teacher.round == 2


def test_load_state_and_architecture_mismatch():
    torch.manual_seed(0)
    source = TinyDenoiser()
    teacher = FrozenTeacher(TinyDenoiser())
    teacher.load_state({"module." + k: v for k, v in source.state_dict().items()}, round=3)
    assert torch.equal(teacher.module.emb.weight, source.emb.weight) and teacher.round == 3
    assert not teacher.module.training and not teacher.module.emb.weight.requires_grad
    with pytest.raises(RuntimeError):
        teacher.load_state({"emb.weight": source.emb.weight})  # strict: missing keys
    with pytest.raises(ValueError, match="lacks teacher parameters"):
        teacher.refresh_from(nn.Linear(2, 2), round=4)
