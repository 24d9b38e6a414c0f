"""Models whose outputs are not one tensor (issue 25, kind 5): choosing the outputs with
``forward_fn`` protects fewer groups (the README's YOLO example), Hugging Face style
``ModelOutput`` dicts and keyword inputs prune as they are, and ``load_pruned`` rebuilds from the
input shapes the plan recorded, without the caller repeating inputs or ``forward_fn``."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn as nn

from kcp_plugin import get_plan, load_pruned, prune, save_pruned


class Detector(nn.Module):
    """A YOLO-shaped detector: in eval mode it returns (decoded predictions, feature maps)."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
                                nn.SiLU())
        self.b3 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU())
        self.h1, self.h2 = nn.Conv2d(16, 6, 1), nn.Conv2d(32, 6, 1)

    def forward(self, x: torch.Tensor):
        a = self.b1(x)
        b = self.b3(self.b2(a))
        pred = torch.cat([self.h1(a).flatten(2), self.h2(b).flatten(2)], 2)
        return pred, [a, b]


class Output(collections.OrderedDict):
    """transformers' ModelOutput in miniature: a dict whose keys are attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class Classifier(nn.Module):
    """Called with keywords (``pixel_values=``), returns ``Output(logits=, hidden_states=)``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, pixel_values: torch.Tensor) -> Output:
        h = self.body(self.stem(pixel_values))
        return Output(logits=self.fc(h.mean((2, 3))), hidden_states=(h,))


def _prune(model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune(model, x, "l1", pruning_ratio=0.5, progress=False, **kwargs)


def test_choosing_a_detectors_outputs_protects_fewer_groups(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    everything = _prune(Detector().eval(), x)
    model = Detector().eval()
    chosen = _prune(model, x, forward_fn=lambda m, x: m(x)[0])  # the README's YOLO line
    assert len(chosen.auto_protected) < len(everything.auto_protected)
    assert chosen.macs_ratio < everything.macs_ratio - 0.2
    save_pruned(model, tmp_path / "det.pt")
    again = load_pruned(lambda: Detector().eval(), tmp_path / "det.pt")  # no inputs, no fwd
    assert torch.equal(again(x)[0], model(x)[0])


def test_keyword_inputs_and_model_outputs_prune_and_reload_without_inputs(tmp_path):
    torch.manual_seed(0)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
    model = Classifier().eval()
    _prune(model, inputs)
    assert model.stem[0].out_channels == 8 and model.fc.out_features == 10
    assert get_plan(model)["inputs"] == {"dict": {"pixel_values": {
        "tensor": [2, 3, 16, 16], "dtype": "torch.float32"}}}
    save_pruned(model, tmp_path / "cls.pt")
    again = load_pruned(Classifier, tmp_path / "cls.pt")
    assert torch.equal(again.eval()(**inputs).logits, model(**inputs).logits)


def test_a_plan_without_recorded_inputs_asks_for_them(tmp_path):
    model, x = Classifier().eval(), {"pixel_values": torch.randn(1, 3, 8, 8)}
    _prune(model, x)
    save_pruned(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["kcp_plugin"]["inputs"]  # what an older version wrote
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="records no example inputs.*pass example_inputs"):
        load_pruned(Classifier, tmp_path / "old.pt")
    assert load_pruned(Classifier, tmp_path / "old.pt", x).stem[0].out_channels == 8


def test_counting_macs_prints_nothing(capsys):
    from kcp_plugin import count_macs_params

    conv = nn.Conv2d(3, 3, 3, padding=1)
    conv.__flops__, conv.__params__ = 0, 0  # left by an earlier count: upstream warns by print
    model = nn.Sequential(conv, nn.ReLU())
    macs, params = count_macs_params(model, torch.randn(1, 3, 8, 8))
    assert macs >= 3 * 3 * 9 * 64 and params == 84
    assert capsys.readouterr().out == ""


class WithNone(nn.Module):
    """Returns ``(logits, None)`` in eval mode, as Ultralytics' RT-DETR does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor):
        return self.head(self.body(x)), None


def test_an_output_holding_none_prunes_and_reloads(tmp_path):
    torch.manual_seed(0)
    model, x = WithNone().eval(), torch.randn(1, 3, 8, 8)
    _prune(model, x)
    assert model.body[0].out_channels == 8
    save_pruned(model, tmp_path / "m.pt")
    again = load_pruned(lambda: WithNone().eval(), tmp_path / "m.pt")
    assert torch.equal(again(x)[0], model(x)[0])


class ListOfImages(nn.Module):
    """Takes a list of [C, H, W] images as one argument and returns a list of dicts, as
    torchvision's detection models do (``model([image])``)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.boxes = nn.Conv2d(16, 4, 1)

    def forward(self, images):
        if not isinstance(images, list) or any(i.dim() != 3 for i in images):
            raise ValueError("images is expected to be a list of 3d tensors")
        feats = self.body(torch.stack(images))
        return [{"boxes": b} for b in self.boxes(feats)]


def test_a_list_taken_whole_prunes_and_reloads_without_a_forward_fn(tmp_path):
    # the replay used to call model(*x) on the saved list, and failed with an error that
    # suggested ignored_layers (torchvision's Faster R-CNN, newcomer trial)
    torch.manual_seed(0)
    model, x = ListOfImages().eval(), [torch.randn(3, 16, 16)]
    select = lambda m, x: m(x)[0]["boxes"]  # noqa: E731
    report = prune(model, x, "l1", target_macs_ratio=0.5, forward_fn=select, progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.02
    save_pruned(model, tmp_path / "pruned.pt")
    loaded = load_pruned(ListOfImages, tmp_path / "pruned.pt").eval()
    with torch.no_grad():
        assert torch.equal(select(loaded, x), select(model, x))
