"""The DiS model family: exact parameter counts, shapes, gradients, conditioning paths, FLOPs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dis_dist.errors import ConfigError
from dis_dist.models import MODEL_NAMES, build_model
from dis_dist.models.flops import count_parameters, model_flops

# The reference implementation's figures (issue #2).
REFERENCE_COUNTS = [
    ("DiS-S/2", 32, 4, 1000, 29_132_752),
    ("DiS-S/4", 32, 4, 1000, 29_115_184),
    ("DiS-B/2", 32, 4, 1000, 121_163_552),
    ("DiS-M/2", 32, 4, 1000, 231_414_560),
    ("DiS-L/2", 32, 4, 1000, 407_249_952),
    ("DiS-H/2", 32, 4, 1000, 906_966_560),
    ("DiS-H/4", 32, 4, 1000, 906_892_928),
    ("DiS-H/2", 64, 4, 1000, 908_146_208),
    ("DiS-S/2", 32, 3, 0, 28_488_008),
    ("DiS-S/2", 32, 3, 10, 28_764_008),
]


@pytest.mark.parametrize("name,size,channels,classes,expected", REFERENCE_COUNTS)
def test_parameter_counts_match_reference(name, size, channels, classes, expected):
    assert count_parameters(name, input_size=size, in_channels=channels, num_classes=classes) == expected


def _small_input(name: str) -> int:
    return 2 * int(name.rsplit("/", 1)[1])  # 2x2 patches


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n.startswith(("DiS-T", "DiS-S"))])
def test_forward_backward_shapes_small_models(name):
    size = _small_input(name)
    model = build_model(name, input_size=size, in_channels=4, num_classes=7, scan_backend="chunked")
    x = torch.randn(2, 4, size, size)
    out = model(x, torch.tensor([0, 999]), torch.tensor([3, 7]))
    assert out.shape == (2, 8, size, size)
    out.square().mean().backward()
    assert model.patch_embed.weight.grad is not None


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if not n.startswith(("DiS-T", "DiS-S"))])
def test_forward_backward_shapes_big_models_on_meta(name):
    size = _small_input(name)
    with torch.device("meta"):
        model = build_model(name, input_size=size, in_channels=4, num_classes=1000, scan_backend="chunked")
        x = torch.randn(2, 4, size, size)
        out = model(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
        assert out.shape == (2, 8, size, size) and out.is_meta
        out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def _randomize_final_layer(model):
    # The final layer is zero-initialised, which blocks every gradient upstream of it.
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.02)


def test_gradients_reach_every_parameter():
    model = build_model("DiS-T/8", input_size=16, in_channels=3, num_classes=5, scan_backend="chunked")
    _randomize_final_layer(model)
    x = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 4, 5])  # 5 = the null class, so its embedding row is used too
    model(x, torch.randint(0, 1000, (4,)), labels).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_initialisation_follows_the_spec():
    model = build_model("DiS-T/4", input_size=16, in_channels=4, num_classes=10)
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.final_layer.adaLN_modulation[1].weight) == 0
    assert torch.count_nonzero(model.pos_embed) == 0
    mixer = model.in_blocks[0].mixer
    # S4D-real A = -(1..N), D = 1, softplus(dt bias) within [dt_min, dt_max].
    assert torch.allclose(-torch.exp(mixer.fwd.A_log[0]), -torch.arange(1, 17, dtype=torch.float32))
    assert torch.all(mixer.bwd.D == 1)
    dt = torch.nn.functional.softplus(mixer.fwd.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.all(model.out_blocks[0].skip_linear.bias == 0)


def test_null_class_is_what_label_dropout_uses():
    model = build_model(
        "DiS-T/8", input_size=16, in_channels=3, num_classes=5, class_dropout_prob=0.999999,
        drop_path_rate=0.0, scan_backend="chunked",
    )
    _randomize_final_layer(model)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999])
    model.train()
    dropped = model(x, t, torch.tensor([0, 2, 4]))  # every label dropped to the null class
    model.eval()
    null = model(x, t, torch.full((3,), 5))
    other = model(x, t, torch.tensor([0, 2, 4]))
    assert torch.allclose(dropped, null, atol=1e-6)
    assert not torch.allclose(other, null, atol=1e-3)


def test_unconditional_model():
    model = build_model("DiS-T/8", input_size=16, in_channels=3, num_classes=0, scan_backend="chunked")
    assert model.label_embed is None and model.final_layer.adaLN_modulation is None
    assert model.pos_embed.shape[1] == 1 + 4  # time token + 2x2 patches
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([3, 4]))
    assert out.shape == (2, 6, 16, 16)


def test_conditional_model_requires_labels_and_sigma_switch():
    model = build_model("DiS-T/8", input_size=16, in_channels=3, num_classes=4, learn_sigma=False)
    with pytest.raises(ValueError, match="labels"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([3]))
    assert model(torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.tensor([1])).shape == (1, 3, 16, 16)


def test_unknown_model_name_lists_choices():
    with pytest.raises(ConfigError, match="DiS-H/2"):
        build_model("DiS-X/2", input_size=32, in_channels=4, num_classes=10)
    with pytest.raises(ConfigError, match="not divisible"):
        build_model("DiS-T/4", input_size=30, in_channels=4, num_classes=10)


@pytest.mark.parametrize("name,classes", [("DiS-T/4", 10), ("DiS-T/2", 0), ("DiS-S/8", 1000)])
def test_matmul_flops_match_flop_counter(name, classes):
    size = 16
    kw = dict(input_size=size, in_channels=4, num_classes=classes)
    model = build_model(name, scan_backend="chunked", **kw)  # the chunked scan uses no matmul
    counter = FlopCounterMode(display=False)
    x = torch.randn(1, 4, size, size)
    with counter, torch.no_grad():
        model(x, torch.tensor([10]), torch.tensor([1]) if classes else None)
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    linear = sum(v for k, v in ops.items() if k.split(".")[-1] in ("mm", "addmm", "bmm"))
    conv = ops.get("aten.convolution", 0)
    analytic = model_flops(name, **kw)
    patch = model.patch_embed
    patch_flops = 2 * (size // patch.stride[0]) ** 2 * patch.weight[0].numel() * patch.out_channels
    assert linear == analytic.matmul - patch_flops
    assert conv == analytic.conv + patch_flops


def test_flops_scale_with_tokens_and_models_cli():
    small = model_flops("DiS-H/2", input_size=32, in_channels=4, num_classes=1000)
    large = model_flops("DiS-H/2", input_size=64, in_channels=4, num_classes=1000)
    assert 3.9 < large.total / small.total < 4.1  # 4x the tokens, linear-time mixer
    assert 400e9 < small.total < 500e9
    out = subprocess.run(
        [sys.executable, "-m", "dis_dist.models"], capture_output=True, text=True, check=True
    ).stdout
    assert "906,966,560" in out and "908,146,208" in out and "GFLOPs" in out


def test_mixer_backward_branch_is_the_reversed_sequence():
    """The published mixer: the backward branch runs conv + scan on the reversed sequence (z
    reversed too) and its output is reversed back; ours uses an anti-causal conv instead."""
    import torch.nn.functional as F

    from dis_dist.models.mamba import BiMamba
    from dis_dist.ops.selective_scan import selective_scan

    mixer = BiMamba(16, scan_backend="reference").double()
    h = torch.randn(2, 7, 16, dtype=torch.float64)
    x, z = mixer.in_proj(h).transpose(1, 2).chunk(2, dim=1)

    def branch(p, x, z):
        causal = F.conv1d(x, p.conv1d.weight, p.conv1d.bias, padding=3, groups=x.shape[1])
        x = F.silu(causal[..., : x.shape[-1]])
        dt, B, C = p.x_proj(x.transpose(1, 2)).split([p.dt_rank, p.d_state, p.d_state], dim=-1)
        delta = (dt @ p.dt_proj.weight.T).transpose(1, 2)
        return selective_scan(x, delta, -torch.exp(p.A_log), B.transpose(1, 2), C.transpose(1, 2), p.D, z,
                              p.dt_proj.bias, True, backend="reference")

    expected = branch(mixer.fwd, x, z) + branch(mixer.bwd, x.flip(-1), z.flip(-1)).flip(-1)
    expected = mixer.out_proj(expected.transpose(1, 2))
    assert torch.allclose(mixer(h), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every):
    """Recomputed blocks (with path dropout active: its randomness is replayed) give the same
    output and gradients as stored activations."""
    def grads(checkpoint_every):
        torch.manual_seed(0)
        model = build_model("DiS-T/4", input_size=16, in_channels=2, num_classes=3, drop_path_rate=0.5)
        model.set_activation_checkpointing(checkpoint_every)
        torch.manual_seed(1)
        x, t, y = torch.randn(2, 2, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([0, 2])
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    (out_a, grads_a), (out_b, grads_b) = grads(0), grads(every)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_meta_init_gives_the_weights_of_the_eager_build() -> None:
    """A model built on the meta device and materialised (as every strategy does) holds the
    weights of the same model built eagerly with the same seed; another seed differs in every
    random parameter."""
    from dis_dist.distributed.init import materialize

    kwargs = dict(input_size=16, in_channels=2, num_classes=5)
    eager = build_model("DiS-T/4", seed=3, **kwargs)
    with torch.device("meta"):
        lazy = build_model("DiS-T/4", **kwargs)
    assert all(p.is_meta for p in lazy.parameters())
    materialize(lazy, torch.device("cpu"), seed=3)
    other = build_model("DiS-T/4", seed=4, **kwargs)
    for (name, a), b, c in zip(eager.named_parameters(), lazy.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        if a.std() > 0 and not name.endswith(("A_log", "D")):  # the random ones
            assert not torch.equal(a, c), name


# The layouts the model writes with einops, as the explicit reshapes/permutes they replaced.
_EXPLICIT_LAYOUTS = {
    "b (h w) (p q c) -> b c (h p) (w q)": lambda t, h, w, p, q: torch.einsum(
        "nhwpqc->nchpwq", t.reshape(t.shape[0], h, w, p, q, -1)).reshape(t.shape[0], -1, h * p, w * q),
    "b d h w -> b (h w) d": lambda t: t.flatten(2).transpose(1, 2),
    "b l d -> b d l": lambda t: t.transpose(1, 2),
    "b d l -> b l d": lambda t: t.transpose(1, 2),
    "b l n -> b n l": lambda t: t.transpose(1, 2),
    "b k l -> b l k": lambda t: t.transpose(1, 2),
    "two b l k -> two b k l": lambda t: t.transpose(-1, -2),
    "b k l -> l b k": lambda t: t.permute(2, 0, 1),
    "l b d -> b d l": lambda t: t.permute(1, 2, 0),
    "two b d l -> two (b l) d": lambda t: t.transpose(-1, -2).reshape(t.shape[0], -1, t.shape[2]),
    "two (b l) d -> two b d l": lambda t, b: t.reshape(t.shape[0], b, -1, t.shape[-1]).transpose(-1, -2),
    "two (b l) n -> two b n l": lambda t, b: t.reshape(t.shape[0], b, -1, t.shape[-1]).transpose(-1, -2),
}


@pytest.mark.parametrize("backend", ["cpu", "chunked"])
def test_einops_layouts_leave_the_model_bit_identical(backend, monkeypatch):
    """Every einops pattern the model and the scan use is the explicit layout it replaced: the
    outputs and every gradient are bit-identical with the explicit versions swapped in."""
    import importlib

    from dis_dist.models.dis import DiS

    modules = [importlib.import_module(f"dis_dist.{name}")
               for name in ("models.dis", "models.mamba", "ops.selective_scan", "ops.selective_scan.chunked")]

    used: set[str] = set()

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = DiS(input_size=16, patch_size=2, in_channels=4, width=32, depth=2, num_classes=10,
                    drop_path_rate=0.0, scan_backend=backend).double()
        x = torch.randn(3, 4, 16, 16, dtype=torch.float64, requires_grad=True)
        out = model(x, torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10]))
        out.square().sum().backward()
        return [out.detach(), x.grad, *(p.grad for p in model.parameters())]

    einops_run = run()

    def explicit(t: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
        used.add(pattern)
        return _EXPLICIT_LAYOUTS[pattern](t, **sizes)

    for module in modules:
        monkeypatch.setattr(module, "rearrange", explicit)
    explicit_run = run()
    assert len(einops_run) == len(explicit_run) > 20
    assert all(torch.equal(a, b) for a, b in zip(einops_run, explicit_run))
    assert len(used) >= 7  # the patterns really ran
