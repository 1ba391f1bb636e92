"""Residual branches as units: pre-norm transformer blocks (two branches in one module), split-concat (C2f)
bottlenecks, models torch.fx cannot trace, several outputs. Removal must equal the model whose removed
branches output zero (SURGERY_RTOL: exact up to fp32 summation order), and export must agree with torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compressor.errors import TraceError
from compressor.graph.capture import capture
from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units, find_units_explained

SURGERY_RTOL = 1e-5


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """timm's pre-norm block: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), Attention(dim, 2), LayerScale(dim)
        self.norm2, self.ls2 = nn.LayerNorm(dim), nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.muted: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ls1(self.attn(self.norm1(x)))
        x = x + (a * 0 if "attn" in self.muted else a)
        m = self.ls2(self.mlp(self.norm2(x)))
        return x + (m * 0 if "mlp" in self.muted else m)


class TinyViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c), Conv(c, c)
        self.muted = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + (y * 0 if self.muted else y)


class C2f(nn.Module):
    """YOLOv8's split-concat block: Python iteration over a chunk, which torch.fx cannot trace."""

    def __init__(self, c: int, n: int = 2) -> None:
        super().__init__()
        self.c = c // 2
        self.cv1, self.cv2 = Conv(c, 2 * self.c), Conv((2 + n) * self.c, c)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class TinyDetector(nn.Module):
    """Two heads at two scales, returning a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 8)
        self.stage1 = C2f(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU())
        self.stage2 = C2f(16)
        self.head1, self.head2 = nn.Conv2d(8, 6, 1), nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p1 = self.stage1(self.stem(x))
        p2 = self.stage2(self.down(p1))
        return self.head1(p1), self.head2(p2)


def _randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _mute(model: nn.Module, names: list[str]) -> None:
    for name in names:
        path, _, branch = name.partition("/")
        block = model.get_submodule(path)
        if isinstance(block, Block):
            block.muted |= {branch} if branch else {"attn", "mlp"}
        else:
            block.muted = True


def test_a_prenorm_block_gives_two_branch_units_and_the_block():
    torch.manual_seed(0)
    model = TinyViT().eval()
    units = find_units(model, torch.randn(1, 3, 16, 16))
    assert [(u.name, u.kind) for u in units[:3]] == [("blocks.0/attn", "branch"), ("blocks.0/mlp", "branch"),
                                                    ("blocks.0", "block")]
    assert len(units) == 9
    attn = units[0]
    assert set(attn.members) == {"attn", "ls1", "norm1"}  # layer scale and the norm go with the branch
    assert units[2].removes_block and not attn.removes_block


@pytest.mark.parametrize("removed", [["blocks.0/attn"], ["blocks.1/mlp"], ["blocks.2"],
                                     ["blocks.0/attn", "blocks.1/mlp", "blocks.2"]])
def test_removing_branches_equals_the_muted_model(removed):
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(4, 3, 16, 16)
    units = {u.name: u for u in find_units(model, x[:1])}
    pruned = remove_units(model, [units[n] for n in removed], x)
    _mute(model, removed)
    with torch.no_grad():
        assert _rel(pruned(x), model(x)) <= SURGERY_RTOL
    params = sum(p.numel() for p in pruned.parameters())
    assert params < sum(p.numel() for p in model.parameters())  # a smaller module, not a mask
    assert not any("muted" in k for k in pruned.state_dict())


def test_two_branches_of_one_block_removed_together_leave_the_identity():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    units = {u.name: u for u in find_units(model, x)}
    pruned = remove_units(model, [units["blocks.1/attn"], units["blocks.1/mlp"]], x)
    whole = remove_units(model, [units["blocks.1"]], x)
    with torch.no_grad():
        assert _rel(pruned(x), whole(x)) <= SURGERY_RTOL
    assert not list(pruned.blocks[1].parameters())


def test_c2f_bottlenecks_are_units_and_the_concat_keeps_its_channels():
    model = _randomised(TinyDetector())
    x = torch.randn(2, 3, 16, 16)
    units, _ = find_units_explained(model, x)
    assert [u.name for u in units] == ["stage1.m.0", "stage1.m.1", "stage2.m.0", "stage2.m.1"]
    assert all(u.kind == "identity" for u in units)
    pruned = remove_units(model, [units[0], units[3]], x)
    _mute(model, [units[0].name, units[3].name])
    with torch.no_grad():
        for got, expected in zip(pruned(x), model(x), strict=True):
            assert _rel(got, expected) <= SURGERY_RTOL
    assert isinstance(pruned.stage1.m[0], nn.Identity)


def test_models_fx_cannot_trace_are_captured_with_torch_export():
    gm = capture(_randomised(TinyDetector()), torch.randn(1, 3, 16, 16))
    assert gm.meta["capture"].method == "torch.export"
    assert {"stage1.m.0.cv1.conv", "head2"} <= {n.target for n in gm.graph.nodes if n.op == "call_module"}
    with pytest.raises(Exception, match="Proxy"):
        torch.fx.symbolic_trace(TinyDetector())


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x  # data-dependent control flow: neither export nor fx can capture it


def test_a_model_neither_capture_can_follow_is_refused_naming_the_submodule():
    with pytest.raises(TraceError) as caught:
        capture(DataDependent(), torch.randn(1, 3, 8, 8))
    message = str(caught.value)
    assert "\n" not in message
    assert "'gate' (Gate)" in message and "torch.export failed" in message


class ChannelsLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # normalises over channels of NCHW
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias).permute(0, 3, 1, 2)


def test_only_layers_with_torch_nns_own_forward_are_lifted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ChannelsLayerNorm(4), nn.ReLU()).eval()
    gm = capture(model, torch.randn(1, 3, 8, 8))
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == ["0", "2"]  # the subclass's permutes stay ATen operations
    x = torch.randn(3, 3, 8, 8)  # another batch size: the batch is symbolic
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_pruned_transformer_exports_to_onnx_and_openvino_agreeing_with_torch(tmp_path):
    from exporters import get_exporter

    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(1, 3, 16, 16)
    units = {u.name: u for u in find_units(model, x)}
    pruned = remove_units(model, [units["blocks.0/attn"], units["blocks.2"]], x)
    for fmt in ("onnx", "openvino"):
        get_exporter(fmt).export(pruned, x, tmp_path / f"m.{fmt}")  # validated against torch before written


def test_a_tuple_output_exports_every_output(tmp_path):
    import onnxruntime as ort

    from exporters import get_exporter

    model = _randomised(TinyDetector())
    x = torch.randn(1, 3, 16, 16)
    path = get_exporter("onnx").export(model, x, tmp_path / "det.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output0", "output1"]
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        for value, expected in zip(got, model(x), strict=True):
            assert value.shape == tuple(expected.shape)


def test_a_checkpoint_with_branches_removed_loads_into_a_fresh_model(tmp_path):
    from compressor.graph.recipe import apply_recipe, make_recipe
    from compressor.models.checkpoint import load_checkpoint, save_checkpoint
    from compressor.models.loaded import LoadedModel

    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    units = {u.name: u for u in find_units(model, x)}
    removed = [units["blocks.0/attn"], units["blocks.2"]]
    pruned = remove_units(model, removed, x)
    with torch.no_grad():
        pruned.blocks[1].mlp[0].weight.mul_(1.5)  # weights the fresh model does not have: they come from the file
    recipe = make_recipe(removed, (3, 16, 16))
    path = save_checkpoint(tmp_path / "m.pt", LoadedModel(pruned, "tests.test_branches:TinyViT", 5, (3, 16, 16),
                                                          "test", [u.name for u in removed]), recipe)
    again = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(again.model(x), pruned(x))
    rebuilt = apply_recipe(TinyViT(), recipe)
    assert set(rebuilt.state_dict()) == set(pruned.state_dict())


@pytest.mark.parametrize("criterion", ["cka", "sr_init", "magnitude", "taylor", "entropy", "random"])
def test_every_criterion_scores_branch_units(criterion):
    """A branch whose output is zeroed (its layer scale 0) costs nothing to remove: CKA and Taylor give it the
    least importance; every criterion scores every unit."""
    from torch.utils.data import DataLoader, TensorDataset

    from compressor.criteria import ScoringContext, score_units

    torch.manual_seed(0)
    model = TinyViT().eval()
    with torch.no_grad():
        model.blocks[1].ls1.gamma.zero_()
    x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(x).argmax(1)
    units = find_units(model, x[:1])
    scores = score_units(criterion, ScoringContext(model, units, DataLoader(TensorDataset(x, labels), batch_size=16),
                                                   repeats=1))
    assert set(scores) == {u.name for u in units}
    assert all(isinstance(v, float) and v == v for v in scores.values())
    if criterion in ("cka", "taylor"):
        assert min(scores, key=scores.get) == "blocks.1/attn"
        assert scores["blocks.1/attn"] == pytest.approx(0.0, abs=1e-9)
    if criterion == "magnitude":  # the branch's own weights: attention's are not the MLP's
        assert scores["blocks.0/attn"] != scores["blocks.0/mlp"]


def test_distillation_of_a_tuple_output_is_zero_at_the_teacher_and_reaches_every_output():
    """The detector's two maps, neither 2-D, are distilled by normalised squared error each; named as
    logits, a map's cells are distilled by KL. A lone 2-D output keeps Hinton's loss with labels."""
    from compressor.finetune.training import distillation_loss

    torch.manual_seed(0)
    teacher = _randomised(TinyDetector())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        target = teacher(x)
    assert float(distillation_loss(target, target, None, 4.0, 0.7)) == pytest.approx(0.0, abs=1e-7)
    for logits in (None, ["output0"]):
        student = TinyDetector()
        loss = distillation_loss(student(x), target, None, 4.0, 0.7, logits)
        loss.backward()
        assert float(loss.detach()) > 0
        assert student.head1.weight.grad.abs().sum() > 0 and student.head2.weight.grad.abs().sum() > 0
    # one map pushed off by its own scale: the normalised error is 1 for it, 0 for the other, mean 0.5
    moved = (target[0] + target[0].std(), target[1])
    expected = (target[0].std() ** 2 / target[0].var()) / 2
    assert float(distillation_loss(moved, target, None, 4.0, 0.7)) == pytest.approx(float(expected), rel=1e-5)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    kd = torch.nn.functional.kl_div(torch.log_softmax(s / 4, 1), torch.log_softmax(t / 4, 1), reduction="batchmean",
                                    log_target=True) * 16
    hinton = 0.7 * kd + 0.3 * torch.nn.functional.cross_entropy(s, y)
    assert float(distillation_loss(s, t, y, 4.0, 0.7)) == pytest.approx(float(hinton), rel=1e-6)
    assert float(distillation_loss((s,), (t,), y, 4.0, 0.7)) == pytest.approx(float(hinton), rel=1e-6)


def test_fine_tuning_a_pruned_detector_moves_its_outputs_toward_the_teacher():
    """Distillation through `train` on unlabelled images, from a tuple-output teacher: the pruned stage's
    output comes closer to the teacher's (BatchNorm statistics frozen, so only learning moves it)."""
    from compressor.finetune.training import train
    from compressor.metrics.outputs import named_outputs

    torch.manual_seed(0)
    teacher = _randomised(TinyDetector())
    x = torch.randn(64, 3, 16, 16)
    units = find_units(teacher, x[:2])
    pruned = remove_units(teacher, [u for u in units if u.name.startswith("stage2")][:1], x[:2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.full((64,), -1)), batch_size=16)

    def error() -> dict[str, float]:
        with torch.no_grad():
            ours, theirs = named_outputs(pruned(x)), named_outputs(teacher(x))
        return {n: float(((ours[n] - t) ** 2).mean() / t.var()) for n, t in theirs.items()}

    before = error()
    train(pruned, loader, 5, 0.01, teacher=teacher, desc="test", freeze_batchnorm=True)
    after = error()
    assert before["output0"] == 0.0 and after["output0"] < 1e-3, (before, after)
    assert after["output1"] < 0.5 * before["output1"], (before, after)


def test_a_detector_is_scored_on_every_output():
    """Without a classifier layer, CKA compares every output, each on its own: a bottleneck that feeds only
    the second head scores what it changes there (on the first output alone it would score 0, in one
    concatenation of both about 1e-11)."""
    from compressor.criteria import ScoringContext, score_units
    from compressor.graph.prefix import SuffixRunner, features_and_logits

    torch.manual_seed(0)
    model = _randomised(TinyDetector())
    x = torch.randn(8, 3, 16, 16)
    units = find_units(model, x[:2])
    second = [u for u in units if u.name.startswith("stage2")]
    assert second
    scores = score_units("cka", ScoringContext(model, units, [(x, torch.zeros(8, dtype=torch.long))]))
    assert all(scores[u.name] > 1e-5 for u in second), scores
    naive = score_units("cka", ScoringContext(model, units, [(x, torch.zeros(8, dtype=torch.long))],
                                              use_cache=False))
    assert naive == pytest.approx(scores, rel=1e-4, abs=1e-6)
    with torch.no_grad():
        features, *outputs = features_and_logits(model, x[:2])(x)
        head1, head2 = model(x)
        assert features.shape == (8, head1[0].numel() + head2[0].numel())
        assert torch.allclose(outputs[1], head2)
        runner = SuffixRunner(model, units, x[:2])
        assert torch.allclose(runner.capture(x)[0], features)


def test_a_deployed_detector_is_validated_on_every_output(tmp_path):
    """The job's check of its artifact compares each output with torch's: a change to the second head
    alone is caught and named."""
    from compressor.errors import ValidationError
    from compressor.latency.deploy import Deployment
    from compressor.latency.profiles import load_profile

    model = _randomised(TinyDetector())
    deployment = Deployment(load_profile("ort-cpu"), (3, 16, 16))
    path = deployment.export(model, tmp_path / "det")
    x = torch.randn(4, 3, 16, 16)
    assert deployment.validate(path, model, x) < 1e-4
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head2.bias.add_(1.0)
    with pytest.raises(ValidationError, match="output1"):
        deployment.validate(path, other, x)
