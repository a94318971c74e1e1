"""Runs inside ``torchrun`` for tests/test_context_parallel.py: the context-parallel scan and
conv halo against the unsplit computation, outputs and every gradient.

    torchrun --nproc_per_node=K tests/cp_run.py SPEC.json

SPEC: ``{"cases": [...], "out"}``, each case either a mixer case
``{"length", "d_inner", "d_state", "batch", "dtype", "backend"}``: every rank builds the same full
inputs (seeded), runs the unsplit conv + scan, then its own slice (uneven when K does not divide
the length); or a model case ``{"model": {"width", "depth", "input_size"}, "batch", "dtype",
"backend", "checkpointing", "splits"}`` (optionally "device"): a DiS (patch 2, class-conditional,
drop path and label dropout on) whole on the last rank against the same DiS with its token sequence
split over the first k ranks, for each k of ``splits``. Rank 0 writes each case's largest relative error (max |a - b| /
max |b| over the outputs and each gradient; for a model case, {k: error}) to ``out``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dis_dist.models.dis import DiS
from dis_dist.ops.selective_scan import bidirectional_selective_scan
from dis_dist.ops.selective_scan.context_parallel import cp_bidirectional_selective_scan, halo_exchange, slice_bounds

D_CONV = 4


def inputs(case: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["length"] * 7 + case["d_inner"])
    dtype = getattr(torch, case["dtype"])
    b, d, n, L = case["batch"], case["d_inner"], case["d_state"], case["length"]

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return {
        "x": rand(b, d, L), "conv_w": rand(2, d, 1, D_CONV, scale=0.5), "conv_b": rand(2, d, scale=0.1),
        "delta": rand(2, b, d, L, scale=0.5), "B": rand(2, b, n, L), "C": rand(2, b, n, L), "z": rand(b, d, L),
        "A": -torch.exp(rand(2, d, n, scale=0.5)), "D": rand(2, d), "delta_bias": rand(2, d, scale=0.1),
        "probe": rand(b, d, L),  # the loss is <probe, y>
    }


def mixer(t: dict[str, torch.Tensor], backend: str, cp: bool) -> torch.Tensor:
    """Conv (causal forward, anti-causal backward branch), silu, then the bidirectional scan:
    the mixer's sequence-mixing part, on the whole sequence or, ``cp``, on this rank's slice."""
    pad = D_CONV - 1
    x = t["x"]
    if cp:
        left, right = halo_exchange(x, pad)
        u = torch.stack([
            F.conv1d(torch.cat([left, x], -1), t["conv_w"][0], t["conv_b"][0], groups=x.shape[1]),
            F.conv1d(torch.cat([x, right], -1), t["conv_w"][1].flip(-1), t["conv_b"][1], groups=x.shape[1]),
        ])
    else:
        length = x.shape[-1]
        u = torch.stack([
            F.conv1d(x, t["conv_w"][0], t["conv_b"][0], padding=pad, groups=x.shape[1])[..., :length],
            F.conv1d(x, t["conv_w"][1].flip(-1), t["conv_b"][1], padding=pad, groups=x.shape[1])[..., pad:],
        ])
    u = F.silu(u)
    scan = cp_bidirectional_selective_scan if cp else bidirectional_selective_scan
    return scan(u, t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["delta_bias"],
                delta_softplus=True, backend=backend)


SEQUENCE = ("x", "delta", "B", "C", "z", "probe")  # split along their last axis


def run_case(case: dict) -> float:
    rank, k = dist.get_rank(), dist.get_world_size()
    full = inputs(case)
    leaves = {name: t.clone().requires_grad_(name != "probe") for name, t in full.items()}
    y_full = mixer(leaves, case["backend"], cp=False)
    (y_full * leaves["probe"]).sum().backward()
    start, end = slice_bounds(case["length"], k, rank)
    local = {name: (t[..., start:end] if name in SEQUENCE else t).clone().requires_grad_(name != "probe")
             for name, t in full.items()}
    y_local = mixer(local, case["backend"], cp=True)
    (y_local * local["probe"]).sum().backward()

    def gather(t: torch.Tensor) -> torch.Tensor:  # every rank's slice, in sequence order
        sizes = [slice_bounds(case["length"], k, r) for r in range(k)]
        longest = max(e - s for s, e in sizes)
        padded = F.pad(t, (0, longest - t.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(k)]
        dist.all_gather(parts, padded)
        return torch.cat([p[..., : e - s] for p, (s, e) in zip(parts, sizes)], -1)

    pairs = [(gather(y_local.detach()), y_full.detach())]
    for name, leaf in local.items():
        if name == "probe":
            continue
        grad = leaf.grad
        if name in SEQUENCE:
            grad = gather(grad)
        else:  # parameters: each rank's part of the gradient, summed
            dist.all_reduce(grad)
        pairs.append((grad, leaves[name].grad))
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)


def run_model_case(case: dict) -> dict[int, float]:
    """The whole model's output (every rank returns it) and every parameter's gradient (each
    rank's part, summed) with the sequence split over the first k ranks for each k of
    ``case["splits"]``, against the unsplit model (computed once, on the last rank, while the
    smaller splits run on the first ranks; sent to rank 0), for the loss <probe, output>:
    {k: max relative error} on rank 0."""
    dtype, device = getattr(torch, case["dtype"]), torch.device(case.get("device", "cpu"))
    shape = case["model"]
    model = DiS(input_size=shape["input_size"], patch_size=2, in_channels=4, width=shape["width"],
                depth=shape["depth"], num_classes=10, scan_backend=case["backend"], seed=3).to(device, dtype)
    with torch.no_grad():  # DiT's zero-initialised final layer would hide every block's gradient
        for p in model.final_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    g = torch.Generator().manual_seed(shape["input_size"])
    b, size = case["batch"], shape["input_size"]
    x = torch.randn(b, 4, size, size, generator=g, dtype=torch.float64).to(device, dtype)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    y = torch.randint(0, 11, (b,), generator=g).to(device)
    probe = torch.randn(b, 8, size, size, generator=g, dtype=torch.float64).to(device, dtype)

    def loss_and_grads(m: DiS) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(11)  # label dropout and drop path draw alike in both runs
        m.zero_grad()
        out = m(x, t, y)
        (out * probe).sum().backward()
        return out.detach(), [p.grad for p in m.parameters()]

    rank, last = dist.get_rank(), dist.get_world_size() - 1
    full = None
    if rank == last:  # the unsplit model, without checkpointing
        full = loss_and_grads(model)
    if case["checkpointing"]:
        model.set_activation_checkpointing(1)
    split = {}  # k -> (output, summed gradients) of the first k ranks splitting the sequence
    for k in case["splits"]:
        group = dist.new_group(list(range(k)))  # collective: every rank creates every group
        if rank < k:
            model.set_context_parallel(group)
            out, grads = loss_and_grads(model)
            for grad in grads:
                dist.all_reduce(grad, group=group)
            split[k] = out, grads
    if last != 0:  # the unsplit output and gradients, to rank 0
        if rank == last:
            for tensor in [full[0], *full[1]]:
                dist.send(tensor.contiguous(), 0)
        elif rank == 0:
            out_full = torch.empty_like(split[case["splits"][0]][0])
            grads_full = [torch.empty_like(p) for p in model.parameters()]
            for tensor in [out_full, *grads_full]:
                dist.recv(tensor, last)
            full = out_full, grads_full
    errors = {}
    if rank == 0:
        out_full, grads_full = full
        for k, (out, grads) in split.items():
            pairs = [(out, out_full), *zip(grads, grads_full)]
            errors[k] = max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)
    return errors


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    errors = [run_model_case(case) if "model" in case else run_case(case) for case in spec["cases"]]
    if dist.get_rank() == 0:
        with open(spec["out"], "w") as f:
            json.dump(errors, f)
    dist.barrier()  # no rank leaves the group before rank 0 has written the errors
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
