"""kcp_plugin.distill: the settings record, the losses, the teacher's kept channels, DCA, the
Distiller and the scheduler's distillation (resume included)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from kcp_plugin import DistillConfig, Distiller, get_plan, load_pruned, prune, save_pruned
from kcp_plugin.distill import losses
from kcp_plugin.distill.channels import kept_channels, resolve_feature_layers
from kcp_plugin.distill.dca import DCAStats
from kcp_plugin.schedule import PruningScheduler


class SegNet(nn.Module):
    """A small dense-labelling net: stem, a residual block, a concat block, a 1x1 head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.block = Residual(16)
        self.mix = Concat(16)
        self.head = nn.Conv2d(32, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.block(self.stem(x))))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Concat(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


def _net(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return SegNet(), torch.randn(2, 3, 16, 16)


# ---------------------------------------------------------------------- the record
def test_config_names_the_choices_of_a_bad_value():
    with pytest.raises(ValueError, match="unknown output distillation 'kll'.*close matches: kl"):
        DistillConfig(output="kll")
    with pytest.raises(ValueError, match="unknown distillation setting 'layer'.*layers"):
        DistillConfig.from_value({"type": "kl", "layer": ["stem"]})
    with pytest.raises(ValueError, match="no term"):
        DistillConfig(output=None)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        DistillConfig(temperature=0)
    with pytest.raises(TypeError, match="distill must be"):
        DistillConfig.from_value(3)


def test_config_reads_what_configs_hold():
    assert DistillConfig.from_value(None) is None
    assert DistillConfig.from_value("cwd").temperature == 4.0  # Shu et al.'s T
    cfg = DistillConfig.from_value({"type": "kl", "layers": "stem.1", "weight": 2})
    assert (cfg.output, cfg.layers, cfg.weight, cfg.temperature) == ("kl", ["stem.1"], 2, 1.0)
    assert DistillConfig("KL").output == "kl"
    assert DistillConfig(**cfg.to_dict()) == cfg


# ---------------------------------------------------------------------- output losses
def test_output_losses_vanish_on_the_teacher_and_grow_away_from_it():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 5, 5)
    s = t + 0.5 * torch.randn_like(t)
    for name in ("kl", "cwd", "l1", "mse"):
        assert losses.OUTPUT_LOSSES[name](t, t, 2.0).abs() < 1e-6, name
        assert losses.OUTPUT_LOSSES[name](s, t, 2.0) > 1e-3, name
    # per-pixel KL is the mean over pixels of the per-sample KL of each pixel's classes
    per_pixel = losses.kl_divergence(s.permute(0, 2, 3, 1).reshape(-1, 4),
                                     t.permute(0, 2, 3, 1).reshape(-1, 4))
    assert torch.allclose(losses.kl_divergence(s, t), per_pixel)
    with pytest.raises(ValueError, match="use 'kl' for classifiers"):
        losses.channel_wise(s[:, :, 0, 0], t[:, :, 0, 0])


def test_regression_distillation_skips_the_teachers_void_values():
    t = torch.tensor([[1.0, float("nan"), 3.0]])
    s = torch.tensor([[2.0, 100.0, 3.0]])
    assert losses.regression(s, t, "l1").item() == pytest.approx(0.5)


# ---------------------------------------------------------------------- kept channels
def test_kept_channels_are_the_teachers_channels_the_student_holds():
    model, x = _net()
    teacher = copy.deepcopy(model).eval()
    prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    kept = kept_channels(teacher, model, ["stem.0", "stem.1", "block.bn2"], x)
    assert len(kept["stem.1"]) == model.stem[1].num_features < 16
    # the first conv reads the image, so its kept output channels are the teacher's exactly
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.stem[0](x), teacher.stem[0](x)[:, kept["stem.0"]])
    # the residual sum couples stem.1 and block.bn2: one index set
    assert torch.equal(kept["stem.1"], kept["block.bn2"])


def test_kept_channels_compose_over_prunes_and_survive_a_reload(tmp_path):
    model, x = _net()
    teacher = copy.deepcopy(model).eval()
    prune(model, x, "l1", pruning_ratio=0.25, progress=False)
    prune(model, x, "l2", pruning_ratio=0.3, progress=False)
    kept = kept_channels(teacher, model, ["stem.0"], x)["stem.0"]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.stem[0](x), teacher.stem[0](x)[:, kept])
    save_pruned(model, tmp_path / "m.pt")
    reloaded = load_pruned(lambda: _net()[0], tmp_path / "m.pt", x)
    assert torch.equal(kept_channels(teacher, reloaded, ["stem.0"], x)["stem.0"], kept)


def test_a_distiller_refuses_a_student_not_pruned_from_its_teacher_when_built():
    model, x = _net()
    teacher = copy.deepcopy(model)
    prune(teacher, x, "l1", pruning_ratio=0.5, progress=False)  # swapped: the teacher is pruned
    with pytest.raises(ValueError, match="teacher and student do not fit"):
        Distiller(teacher, model, {"output": "kl", "layers": ["block"]}, x)


def test_a_student_not_pruned_from_the_teacher_is_refused():
    model, x = _net()
    other = copy.deepcopy(model)
    prune(other, x, "l1", pruning_ratio=0.5, progress=False)
    teacher = copy.deepcopy(other)  # the teacher is pruned, the student is not
    with pytest.raises(ValueError, match="not pruned from this teacher"):
        kept_channels(teacher, model, ["stem.0"], x)


def test_a_container_is_compared_where_its_channels_are_owned():
    model, x = _net()
    layers = resolve_feature_layers(model, ["block", "stem"], x)
    assert [(f.name, f.owner) for f in layers] == [("block", "block.bn2"), ("stem", "stem.1")]
    with pytest.raises(ValueError, match="'mix'.*adapter=True"):
        resolve_feature_layers(model, ["mix"], x)  # a concat: no single owner
    with pytest.raises(ValueError, match="does not exist in the teacher.*close matches: block"):
        resolve_feature_layers(model, ["blok"], x)
    with pytest.raises(ValueError, match=r"'conv1'.*close matches: block\.conv1.*named_modules"):
        resolve_feature_layers(model, ["conv1"], x)  # the qualified name is offered


# ---------------------------------------------------------------------- DCA
def test_dca_finds_the_discriminant_direction_and_whitens_it():
    torch.manual_seed(0)
    n = 4000
    labels = torch.randint(0, 2, (n,))
    feats = torch.randn(n, 3) * torch.tensor([5.0, 1.0, 0.2])  # large noise on channel 0
    feats[:, 2] += 2.0 * labels  # the classes differ along channel 2 only
    stats = DCAStats(3)
    for chunk in range(4):
        rows = slice(chunk * 1000, (chunk + 1) * 1000)
        stats.add(feats[rows], labels[rows])
    mean, w = stats.projection()
    assert w.shape == (3, 1)  # classes - 1 directions
    assert w[:, 0].abs().argmax().item() == 2
    projected = (feats - mean) @ w
    assert projected.var().item() == pytest.approx(1.0, rel=0.05)
    # restricted to kept channels: the projection is re-cut without new data
    _, w_kept = stats.projection(torch.tensor([0, 2]))
    assert w_kept.shape == (2, 1) and w_kept[:, 0].abs().argmax().item() == 1


def test_dca_refuses_regression_targets_and_one_class():
    stats = DCAStats(3)
    with pytest.raises(ValueError, match="class labels"):
        stats.add(torch.randn(4, 3), torch.randn(4))
    stats.add(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least two classes"):
        stats.projection()


def test_dca_reads_per_pixel_labels_at_the_feature_maps_size():
    stats = DCAStats(2, ignore_index=255)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    labels[:, 0, 0] = 255
    stats.add(torch.randn(1, 2, 4, 4), labels)
    assert stats.n.tolist() == [7.0, 8.0]  # 16 pixels at 4x4, the void one left out


# ---------------------------------------------------------------------- the distiller
def _distiller(model, x, **cfg):
    return Distiller(copy.deepcopy(model), model, DistillConfig(**cfg), x)


def test_the_teacher_is_frozen_and_outside_what_the_optimizer_and_ddp_see():
    model, x = _net()
    d = _distiller(model, x, output="kl", layers=["stem", "block"])
    assert not d.teacher.training
    assert not any(p.requires_grad for p in d.teacher.parameters())
    assert list(d.parameters()) == [] and "teacher" not in dict(d.named_modules())
    prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    model.train()
    terms = d(x, model(x))
    assert set(terms) == {"loss_distill_out", "loss_distill_feat"}
    sum(terms.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert model.stem[0].weight.grad is not None


def test_one_teacher_forward_per_step_and_nothing_at_inference():
    model, x = _net()
    d = _distiller(model, x, output="kl", layers=["block"])
    calls = []
    d.teacher.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    for _ in range(3):
        d(x, model(x))
    assert len(calls) == 3
    model.eval()
    model(x)
    assert d._student_feats == {}  # the eval forward captured nothing
    d.remove()
    model.train()
    model(x)
    assert d._student_feats == {}


def test_bad_layers_and_outputs_are_refused_before_training():
    model, x = _net()
    with pytest.raises(ValueError, match="'blok' does not exist in the student"):
        _distiller(model, x, layers=["blok"])
    other = SegNet(classes=5)
    with pytest.raises(ValueError, match=r"teacher's output has shape \(2, 5, 16, 16\) and the "
                                         r"student's \(2, 3, 16, 16\)"):
        Distiller(other, model, "kl", x)
    d = _distiller(model, x, dca_layers=["block"], output=None)
    model.train()
    with pytest.raises(ValueError, match="need the step's class labels"):
        d(x, model(x))
    model(x)
    with pytest.raises(ValueError, match="class labels"):
        d(x, model(x), labels=torch.randn(2, 16, 16))


def test_distillation_pulls_a_pruned_student_towards_the_teacher():
    model, x = _net()
    d = _distiller(model, x, output="kl", layers=["block"], dca_layers=["block"],
                   dca_batches=2)
    prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    labels = (x[:, 0] > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    first = None
    for step in range(30):
        terms = d(x, model(x), labels=labels)
        if step == 0:
            assert terms["loss_distill_dca"].item() == 0.0  # statistics still being collected
        if step == 2:
            first = {k: v.item() for k, v in terms.items()}
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    last = {k: v.item() for k, v in terms.items()}
    assert all(last[k] < first[k] for k in first), (first, last)


def test_adapters_map_any_student_width_and_reload():
    model, x = _net()
    d = _distiller(model, x, output=None, layers=["mix"], adapter=True)
    prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    model.train()
    d(x, model(x))
    state = d.state_dict()
    assert any(k.startswith("adapters.") for k in state)
    fresh = Distiller(copy.deepcopy(d.teacher), model, d.config, x)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.adapters["mix"].weight, d.adapters["mix"].weight)


# ---------------------------------------------------------------------- the schedule
def test_schedule_refuses_what_it_cannot_distil():
    model, x = _net()
    with pytest.raises(ValueError, match="adapter"):
        PruningScheduler(model, x, "l1", target_macs_ratio=0.5, distill={"layers": ["block"],
                                                                         "adapter": True})
    with pytest.raises(ValueError, match="teacher= is given without distill="):
        PruningScheduler(model, x, "l1", target_macs_ratio=0.5, teacher=copy.deepcopy(model))
    prune(model, x, "l1", pruning_ratio=0.25, progress=False)
    with pytest.raises(ValueError, match="pass teacher="):
        PruningScheduler(model, x, "l1", target_macs_ratio=0.5, distill="kl")


def _schedule_run(tmp_path, stop_at: int | None = None, resume: bool = False) -> nn.Module:
    """Train 8 steps with 2 pruning points (calls 2, 5) and distillation; optionally stop after
    ``stop_at`` steps (saving model, teacher, scheduler and optimizer) or resume from there."""
    torch.manual_seed(0)
    model, x = SegNet(), torch.randn(4, 3, 16, 16)
    batches = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(s))
               for s in range(8)]  # a batch per step: the DCA statistics depend on which
    distill = {"output": "kl", "layers": ["block"], "dca_layers": ["block"], "dca_batches": 1}
    start = 0
    if resume:
        state = torch.load(tmp_path / "state.pt", weights_only=True)
        teacher = SegNet()
        teacher.load_state_dict(torch.load(tmp_path / "teacher.pt", weights_only=True))
        model = load_pruned(SegNet, tmp_path / "model.pt", x)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = PruningScheduler(model, x, "l1", target_macs_ratio=0.4, num_prunes=2, start=2,
                                 every=3, optimizer=opt, distill=distill, teacher=teacher)
        sched.load_state_dict(state["scheduler"])
        opt.load_state_dict(state["optimizer"])
        start = sched.calls
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = PruningScheduler(model, x, "l1", target_macs_ratio=0.4, num_prunes=2, start=2,
                                 every=3, optimizer=opt, distill=distill)
        torch.save(sched.distiller.teacher.state_dict(), tmp_path / "teacher.pt")
    model.train()
    for step in range(start, 8):
        xb = batches[step]
        labels = (xb[:, 0] > 0).long()
        out = model(xb)
        loss = nn.functional.cross_entropy(out, labels)
        loss = loss + sum(sched.distill_loss(xb, out, labels).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if stop_at is not None and step + 1 == stop_at:
            save_pruned(model, tmp_path / "model.pt")
            torch.save({"scheduler": sched.state_dict(), "optimizer": opt.state_dict()},
                       tmp_path / "state.pt")
            return model
    return model


def test_a_resumed_distilling_schedule_ends_where_the_uninterrupted_one_does(tmp_path):
    whole = _schedule_run(tmp_path)
    assert len(get_plan(whole)["history"]) > 0
    _schedule_run(tmp_path, stop_at=4)  # after the first pruning point, DCA fitted
    resumed = _schedule_run(tmp_path, resume=True)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_the_plain_pytorch_example_of_the_docs_runs():
    """docs/distill.md's first example, as written (a minute's worth of it, on generated data)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "distill.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(compile(code, "docs/distill.md", "exec"), scope)
    assert scope["terms"].keys() == {"loss_distill_out", "loss_distill_dca"} | (
        {"loss_distill_feat"})
    assert scope["distiller"]._handles == []
