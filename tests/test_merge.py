"""Merging linear ops into one conv: exact merges equal the original everywhere, border-approximate
ones on the interior, everything else is refused with a reason.

Errors are measured as max |merged - original| / max |original| over the whole output, in fp32
(MERGE_RTOL = 1e-5; composing in float64 and rounding once leaves ~1e-7, a wrong kernel O(1)).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from compressor.errors import InputError, MergeRefused, ValidationError
from compressor.graph.units import find_units
from compressor.models.zoo import build
from compressor.rewrite.block import check_merge, linearise, merge_block
from compressor.rewrite.compose import (
    MERGE_RTOL,
    add_identity,
    add_parallel,
    bn_as_conv,
    compose,
    merge_chain,
)
from compressor.rewrite.fold import fold_batchnorm, fold_bn_into_conv
from tests.helpers import randomise_batchnorm

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DIVISORS = {1: [1], 2: [1, 2], 3: [1, 3], 4: [1, 2, 4], 6: [1, 2, 3, 6]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs: torch's thread pool only adds contention (6x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv(draw, cin, cout, *, kernel=None, stride=None, padding=None, bias=None, groups=None, **extra):
    common = [g for g in DIVISORS[cin] if cout % g == 0]
    conv = nn.Conv2d(
        cin, cout,
        kernel if kernel is not None else draw(st.integers(1, 3)),
        stride if stride is not None else draw(st.integers(1, 2)),
        padding if padding is not None else draw(st.integers(0, 2)),
        groups=groups if groups is not None else draw(st.sampled_from(common)),
        bias=bias if bias is not None else draw(st.booleans()), **extra)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    return conv.eval()


def _bn(draw, channels, zero_shift=False):
    bn = nn.BatchNorm2d(channels, eps=draw(st.sampled_from([1e-5, 1e-3])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    bn.running_var.copy_(torch.rand(channels, generator=g) * 2 + 0.1)
    bn.weight.data.copy_(torch.randn(channels, generator=g))
    if not zero_shift:
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.bias.data.copy_(torch.randn(channels, generator=g))
    return bn.eval()


def _channels(draw):
    return draw(st.sampled_from([1, 2, 3, 4, 6]))


def _input(draw, channels, low=10, high=16):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(2, channels, draw(st.integers(low, high)), draw(st.integers(low, high)), generator=g)


def _errors(got, expected, border):
    """(error everywhere, error on the interior) relative to max|expected|; interior None if empty."""
    assert got.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-12)
    diff = (got - expected).abs() / scale
    h, w = diff.shape[-2:]
    inner = diff[..., border:h - border, border:w - border]
    return float(diff.max()), (float(inner.max()) if inner.numel() else None)


@torch.no_grad()
def _run(module, x):
    return module(x)


# ---- exact folds -------------------------------------------------------------------------------

@PROPERTY
@given(st.data())
def test_conv_then_bn_folds_exactly(data):
    draw = data.draw
    cin, cout = _channels(draw), _channels(draw)
    conv, bn = _conv(draw, cin, cout), _bn(draw, cout)
    x = _input(draw, cin)
    expected = _run(lambda t: bn(conv(t)), x)
    merged = compose(conv, bn_as_conv(bn))
    assert merged.exact and merged.border == 0
    assert _errors(_run(merged.conv, x), expected, 0)[0] <= MERGE_RTOL
    folded, count = fold_batchnorm(nn.Sequential(conv, bn))
    assert count == 1
    assert _errors(_run(folded, x), expected, 0)[0] <= MERGE_RTOL


@PROPERTY
@given(st.data())
def test_bn_then_conv_folds_exactly_or_is_refused(data):
    """Exact when the conv cannot pad BN's shift: no padding, a copying padding mode, or no shift."""
    draw = data.draw
    cin, cout = _channels(draw), _channels(draw)
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    conv = _conv(draw, cin, cout, padding=draw(st.integers(0, 2)), padding_mode=mode)
    zero_shift = draw(st.booleans())
    bn = _bn(draw, cin, zero_shift=zero_shift)
    x = _input(draw, cin)
    padded = any(conv.padding)
    if padded and mode == "zeros" and not zero_shift:
        with pytest.raises(MergeRefused, match="zero-padded conv: the padding would skip BN's shift"):
            fold_bn_into_conv(bn, conv)
        return
    folded = fold_bn_into_conv(bn, conv)
    assert folded.weight.shape == conv.weight.shape and folded.bias is not None
    assert _errors(_run(folded, x), _run(lambda t: conv(bn(t)), x), 0)[0] <= MERGE_RTOL


# ---- conv -> conv --------------------------------------------------------------------------------

@PROPERTY
@given(st.data())
def test_composed_convs_match_on_the_interior_and_exact_ones_everywhere(data):
    """Any two zero-padded, undilated convs compose; exact iff the second has no padding or the
    first maps the padded ring to zero (no bias and p1 >= k1 - 1)."""
    draw = data.draw
    cin, mid, cout = _channels(draw), _channels(draw), _channels(draw)
    first, second = _conv(draw, cin, mid), _conv(draw, mid, cout)
    x = _input(draw, cin, 14, 20)
    expected = _run(lambda t: second(first(t)), x)
    merged = compose(first, second)
    p1, k1, p2 = first.padding[0], first.kernel_size[0], second.padding[0]
    assert merged.exact == (p2 == 0 or (first.bias is None and p1 >= k1 - 1))
    assert merged.conv.groups == math.gcd(first.groups, second.groups)
    everywhere, interior = _errors(_run(merged.conv, x), expected, merged.border)
    if merged.exact:
        assert merged.border == 0 and everywhere <= MERGE_RTOL
    else:
        assert merged.border == -(-p2 // second.stride[0]) and merged.notes
        event("border-approximate, interior checked" if interior is not None else "no interior")
        if interior is not None:
            assert interior <= MERGE_RTOL


@PROPERTY
@given(st.data())
def test_kxk_then_1x1_and_unbiased_1x1_then_kxk_are_exact(data):
    draw = data.draw
    cin, mid, cout = _channels(draw), _channels(draw), _channels(draw)
    if draw(st.booleans()):  # any conv followed by a 1x1 (any stride, no padding)
        first, second = _conv(draw, cin, mid), _conv(draw, mid, cout, kernel=1, padding=0)
    else:  # a 1x1 without bias followed by any padded conv
        first, second = _conv(draw, cin, mid, kernel=1, padding=0, bias=False), _conv(draw, mid, cout)
    x = _input(draw, cin)
    merged = compose(first, second)
    assert merged.exact and merged.border == 0
    assert _errors(_run(merged.conv, x), _run(lambda t: second(first(t)), x), 0)[0] <= MERGE_RTOL


@PROPERTY
@given(st.data())
def test_identity_shortcut_into_the_kernel_centre_is_exact(data):
    draw = data.draw
    channels = _channels(draw)
    k = draw(st.sampled_from([1, 3, 5]))
    conv = _conv(draw, channels, channels, kernel=k, stride=1, padding=k // 2)
    x = _input(draw, channels)
    merged = add_identity(conv)
    assert merged.exact and merged.conv.kernel_size == (k, k)
    assert _errors(_run(merged.conv, x), _run(lambda t: conv(t) + t, x), 0)[0] <= MERGE_RTOL


@PROPERTY
@given(st.data())
def test_residual_chain_with_batchnorm_matches_on_the_interior(data):
    """conv-BN-conv-BN (+ identity or a 1x1 projection): one conv, exact away from the border."""
    draw = data.draw
    cin = _channels(draw)
    cout = cin if draw(st.booleans()) else _channels(draw)
    stride = 1 if cout == cin and draw(st.booleans()) else draw(st.integers(1, 2))
    k1, k2 = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 3]))
    c1 = _conv(draw, cin, cout, kernel=k1, stride=stride, padding=k1 // 2, bias=False)
    c2 = _conv(draw, cout, cout, kernel=k2, stride=1, padding=k2 // 2, bias=False)
    b1, b2 = _bn(draw, cout), _bn(draw, cout)
    projection = None if stride == 1 and cin == cout else [_conv(draw, cin, cout, kernel=1, stride=stride,
                                                                 padding=0, bias=False), _bn(draw, cout)]
    x = _input(draw, cin)

    def original(t):
        y = b2(c2(b1(c1(t))))
        return y + (t if projection is None else projection[1](projection[0](t)))

    merged = merge_chain([c1, b1, c2, b2], [] if projection is None else projection)
    assert merged.exact == (k2 == 1)
    everywhere, interior = _errors(_run(merged.conv, x), _run(original, x), merged.border)
    event("exact" if merged.exact else "interior checked" if interior is not None else "no interior")
    if merged.exact:
        assert everywhere <= MERGE_RTOL
    elif interior is not None:
        assert interior <= MERGE_RTOL


@pytest.mark.parametrize(("g1", "g2", "groups"), [(2, 3, 1), (4, 6, 2), (12, 4, 4), (1, 12, 1), (12, 12, 12)])
def test_groups_compose_to_their_gcd(g1, g2, groups):
    """Merged group q covers a block of the middle channels that is a union of both convs' groups."""
    torch.manual_seed(0)
    first = nn.Conv2d(12, 12, 3, 2, 0, groups=g1).eval()
    second = nn.Conv2d(12, 24, 3, 1, 0, groups=g2).eval()
    x = torch.randn(2, 12, 13, 13, generator=torch.Generator().manual_seed(0))
    merged = compose(first, second)
    assert merged.exact and merged.conv.groups == groups and merged.conv.kernel_size == (7, 7)
    assert _errors(_run(merged.conv, x), _run(lambda t: second(first(t)), x), 0)[0] <= MERGE_RTOL


# ---- refusals ------------------------------------------------------------------------------------

@PROPERTY
@given(st.data())
def test_dilation_and_copying_padding_merge_only_with_a_pointwise_neighbour(data):
    """Next to a pointwise conv (1x1, stride 1, unpadded) they merge exactly; otherwise refused."""
    draw = data.draw
    cin, mid, cout = _channels(draw), _channels(draw), _channels(draw)
    odd = {"dilation": 2} if draw(st.booleans()) else {"padding_mode": draw(st.sampled_from(["reflect", "circular"]))}
    pointwise_partner = draw(st.booleans())
    odd_first = draw(st.booleans())
    special = {"kernel": 3, "padding": draw(st.integers(1, 2)), **odd}
    if pointwise_partner:
        partner = {"kernel": 1, "stride": 1, "padding": 0}
    else:
        partner = {"kernel": 3, "padding": draw(st.integers(0, 1))}
    kw1, kw2 = (special, partner) if odd_first else (partner, special)
    first, second = _conv(draw, cin, mid, **kw1), _conv(draw, mid, cout, **kw2)
    x = _input(draw, cin)
    if not pointwise_partner:
        expected = "dilated" if "dilation" in odd else "pads with"
        with pytest.raises(MergeRefused, match=expected):
            compose(first, second)
        return
    merged = compose(first, second)
    # a biased pointwise conv before a zero-padded one still reaches the padded ring
    biased_into_zero_padding = not odd_first and first.bias is not None and "padding_mode" not in odd
    assert merged.exact != biased_into_zero_padding
    everywhere, interior = _errors(_run(merged.conv, x), _run(lambda t: second(first(t)), x), merged.border)
    assert (everywhere if merged.exact else interior) <= MERGE_RTOL


@PROPERTY
@given(st.data())
def test_unchainable_or_unaligned_ops_are_refused_with_a_reason(data):
    draw = data.draw
    a, b = _channels(draw), _channels(draw)
    case = draw(st.sampled_from(["channels", "identity_channels", "identity_stride", "identity_uncentred",
                                 "parallel_stride", "parallel_unaligned", "subclass", "asymmetric_same"]))
    if case == "channels":
        c = draw(st.sampled_from([n for n in DIVISORS if n != b]))
        ops, reason = (compose, _conv(draw, a, b), _conv(draw, c, a)), "channels"
    elif case == "identity_channels":
        c = draw(st.sampled_from([n for n in DIVISORS if n != a]))
        ops, reason = (add_identity, _conv(draw, a, c, kernel=3, stride=1, padding=1)), "as many output"
    elif case == "identity_stride":
        ops, reason = (add_identity, _conv(draw, a, a, kernel=3, stride=2, padding=1)), "stride 1"
    elif case == "identity_uncentred":
        k = draw(st.sampled_from([2, 3]))
        ops, reason = (add_identity, _conv(draw, a, a, kernel=k, stride=1, padding=0)), "centred"
    elif case == "parallel_stride":
        ops, reason = (add_parallel, _conv(draw, a, b, stride=1), _conv(draw, a, b, stride=2)), "strides"
    elif case == "parallel_unaligned":
        ops, reason = (add_parallel, _conv(draw, a, b, kernel=3, stride=1, padding=1),
                       _conv(draw, a, b, kernel=3, stride=1, padding=0)), \
            "do not align"
    elif case == "subclass":
        class MyConv(nn.Conv2d):
            pass
        ops, reason = (compose, _conv(draw, a, b), MyConv(b, a, 1)), "not a plain nn.Conv2d"
    else:
        ops, reason = (compose, _conv(draw, a, b), _conv(draw, b, a, kernel=2, stride=1, padding="same")), \
            "asymmetrically"
    with pytest.raises(MergeRefused, match=reason) as refused:
        ops[0](*ops[1:])
    assert refused.value.reason and "\n" not in refused.value.reason


# ---- whole blocks (known answers) ----------------------------------------------------------------

def _block(arch, name):
    return randomise_batchnorm(build(arch, 10)).get_submodule(name)


def _x(channels, size=16, seed=1):
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_cifar_basic_block_with_identity_becomes_one_5x5_conv():
    block = _block("resnet20", "layer1.0")
    merged = merge_block(block)
    conv = merged.merged.conv
    assert isinstance(merged.module, nn.Sequential) and isinstance(merged.module[1], nn.ReLU)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (16, 16, (5, 5), (2, 2))
    assert not merged.exact and merged.border == 1 and merged.linearised == ("relu1",)
    check = check_merge(block, merged, _x(16))
    assert check.interior_rel <= MERGE_RTOL  # measured ~1e-6
    assert check.border_abs > 1e-2  # measured ~3: the padded ring sees conv1's BN shift


@pytest.mark.parametrize(("arch", "name", "cin", "shape"), [
    ("resnet20", "layer2.0", 16, (32, 16, 7, 2)),  # 3x3 s2 -> 3x3, + 1x1 s2 projection at the centre
    ("resnet18", "layer1.0", 64, (64, 64, 5, 1)),
    ("resnet18", "layer2.0", 64, (128, 64, 7, 2)),
    ("resnet50", "layer1.0", 64, (256, 64, 3, 1)),  # bottleneck 1x1-3x3-1x1 + projection
])
def test_residual_blocks_become_one_conv(arch, name, cin, shape):
    block = _block(arch, name)
    merged = merge_block(block)
    conv = merged.merged.conv
    assert (conv.out_channels, conv.in_channels, conv.kernel_size[0], conv.stride[0]) == shape
    assert conv.groups == 1 and merged.border == 1 and not merged.exact
    check = check_merge(block, merged, _x(cin))
    assert check.interior_rel <= MERGE_RTOL and check.border_abs > 0


def test_mobilenet_v2_inverted_residual_becomes_one_dense_conv():
    block = _block("mobilenet_v2", "features.3")  # 24 -> 144 (pw) -> dw 3x3 -> 24 (pw), + x
    merged = merge_block(block)
    conv = merged.merged.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.groups) == (24, 24, (3, 3), 1)
    assert merged.module is conv and merged.post == () and len(merged.linearised) == 2
    assert merged.border == 1 and any("bias" in n for n in merged.merged.notes)
    check = check_merge(block, merged, _x(24))
    assert check.interior_rel <= MERGE_RTOL and check.border_abs > 0


def test_mobilenet_v2_block_without_expansion_merges_exactly():
    block = _block("mobilenet_v2", "features.1")  # dw 3x3 -> pw: the 1x1 after needs no padding
    merged = merge_block(block)
    assert merged.exact and merged.border == 0
    check = check_merge(block, merged, _x(32))
    assert check.interior_rel <= MERGE_RTOL and check.border_abs == 0


def test_squeeze_excite_is_refused_with_the_node():
    with pytest.raises(MergeRefused, match=r"avgpool \(AdaptiveAvgPool2d\) is not a conv"):
        merge_block(_block("mobilenet_v3_small", "features.1"))


def test_linearise_removes_inner_activations_and_keeps_the_trailing_one():
    block = _block("resnet18", "layer1.0")  # one nn.ReLU module used inside the branch and after the add
    gm = linearise(block)
    relus = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "relu"]
    assert len(relus) == 1 and next(iter(relus[0].args[0].users)) is relus[0]
    x = _x(64)
    with torch.no_grad():
        assert torch.allclose(gm(x), torch.relu(block.bn2(block.conv2(block.bn1(block.conv1(x)))) + x), atol=1e-5)


def test_check_merge_rejects_a_wrong_kernel_and_a_too_small_input():
    block = _block("resnet20", "layer1.0")
    merged = merge_block(block)
    with pytest.raises(InputError, match="too small"):
        check_merge(block, merged, _x(16, size=2))
    with torch.no_grad():
        merged.merged.conv.weight[:, :, 2, 2] += 0.1
    with pytest.raises(ValidationError, match="inside the 1-pixel border"):
        check_merge(block, merged, _x(16))


def test_refused_block_ops_name_the_node():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.pool = nn.MaxPool2d(3, 1, 1)

        def forward(self, x):
            return x + self.pool(self.conv(x))

    with pytest.raises(MergeRefused, match="pool"):
        merge_block(Pooled().eval())
    with pytest.raises(MergeRefused, match="no conv"):
        merge_block(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet_v2", "mobilenet_v3_small"])
def test_every_unit_merges_with_a_checked_interior_or_is_refused_with_a_reason(arch):
    model = randomise_batchnorm(build(arch, 10))
    size = 32 if arch == "resnet20" else 64
    inputs = {}
    hooks = [model.get_submodule(u.name).register_forward_pre_hook(
        lambda m, args, name=u.name: inputs.setdefault(name, args[0])) for u in find_units(model, _x(3, size))]
    with torch.no_grad():
        model(_x(3, size))
    for h in hooks:
        h.remove()
    assert inputs
    for name, x in inputs.items():
        block = model.get_submodule(name)
        try:
            merged = merge_block(block)
        except MergeRefused as e:
            assert arch == "mobilenet_v3_small" and "is not a conv" in e.reason
            continue
        if x.shape[-1] > 2 * merged.border:
            assert check_merge(block, merged, x).interior_rel <= MERGE_RTOL
