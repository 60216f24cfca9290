"""The distillation loss and driver."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import ConfigError, DataError, DistillConfig, TrainingError, kd_loss
from planted import Net, task


def test_kd_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    alpha, temp = 0.3, 2.0
    ce = -sum(math.log(torch.softmax(s[i], 0)[y[i]]) for i in range(5)) / 5
    kl = 0.0
    for i in range(5):
        pt, ps = torch.softmax(t[i] / temp, 0), torch.softmax(s[i] / temp, 0)
        kl += float((pt * (pt.log() - ps.log())).sum())
    expected = alpha * ce + (1 - alpha) * temp**2 * kl / 5
    loss, parts = kd_loss(s, t, y, alpha, temp)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert parts["task"] == pytest.approx(ce, rel=1e-6) and parts["kd"] == pytest.approx(temp**2 * kl / 5, rel=1e-5)


def test_kd_loss_flattens_token_logits_and_checks_shapes():
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    y = torch.randint(0, 7, (2, 4))
    loss, _ = kd_loss(s, t, y, 0.5)
    flat, _ = kd_loss(s.reshape(8, 7), t.reshape(8, 7), y.reshape(8), 0.5)
    assert float(loss) == pytest.approx(float(flat))
    with pytest.raises(DataError, match="same shape"):
        kd_loss(s, torch.randn(2, 4, 6), y, 0.5)


def test_alpha_one_is_plain_fine_tuning():
    """α = 1 ignores the teacher: the same parameters as a hand-written cross-entropy loop."""
    train, _ = task()
    config = DistillConfig(alpha=1, epochs=2, lr=1e-2, schedule="constant", clip_grad_norm=None, progress=False)
    torch.manual_seed(1)
    start = Net()
    student, reference = Net(), Net()
    student.load_state_dict(start.state_dict())
    reference.load_state_dict(start.state_dict())
    fxcompress.distill(student, Net(), train, config)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            opt.step()
    for a, b in zip(student.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_distillation_pulls_the_student_towards_the_teacher():
    train, val = task()
    torch.manual_seed(2)
    teacher, student = Net(), Net()
    gap = lambda: float(sum((student(x).softmax(-1) - teacher(x).softmax(-1)).abs().sum().detach() for x, _ in val))  # noqa: E731,E501
    before = gap()
    result = fxcompress.distill(student, teacher, train, DistillConfig(alpha=0.0, epochs=2, progress=False),
                                val_data=val)
    assert gap() < 0.5 * before
    assert result.steps == 60 and len(result.history) == 2 and "val" in result.history[-1]


def test_metrics_are_logged_as_json_lines(tmp_path):
    import json

    train, val = task()
    fxcompress.distill(Net(), None, train, DistillConfig(alpha=1, log_every=10, progress=False), val_data=val,
                       log_path=tmp_path / "m.jsonl")
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "lr" in r] == [10, 20, 30]
    assert 0 <= records[-1]["val"] <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), "alpha must lie in"),
    (dict(alpha=-0.1), "alpha must lie in"),
    (dict(temperature=0), "temperature"),
    (dict(optimizer="lion"), "optimizer must be one of"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**kwargs)


def test_bad_training_input_is_a_clear_error():
    train, _ = task()
    with pytest.raises(DataError, match="empty"):
        fxcompress.distill(Net(), Net(), [], DistillConfig(progress=False))
    with pytest.raises(ConfigError, match="needs a teacher"):
        fxcompress.distill(Net(), None, train, DistillConfig(alpha=0.5, progress=False))
    with pytest.raises(DataError, match="same shape"):
        fxcompress.distill(Net(), Net(classes=5), train, DistillConfig(progress=False))
    with pytest.raises(DataError, match="target"):
        fxcompress.distill(Net(), Net(), [torch.randn(4, 48)], DistillConfig(progress=False))
    bad = [(torch.full((4, 48), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(TrainingError, match="step 0"):
        fxcompress.distill(Net(), Net(), bad, DistillConfig(progress=False))


def test_teacher_mode_is_restored_and_frozen():
    train, _ = task()
    teacher = Net().train()
    before = [p.clone() for p in teacher.parameters()]
    fxcompress.distill(Net(), teacher, train[:3], DistillConfig(progress=False))
    assert teacher.training
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
