"""FSDP2 round trip of an attached model, run by tests/shared/test_distributed.py in a world of one
process (in the test process) and of two (`torchrun --nproc_per_node 2 tests/shared/fsdp_check.py OUT`).

A tiny ViT with LoRA (qkv) + a bottleneck adapter (FFN) + a linear head is sharded with
`shared.distributed.fully_shard_model`; its outputs must equal the unsharded model's, every trainable
tensor must get the unsharded model's gradient, and `peft.save` from the sharded model (every process
calls it, process 0 writes) then `peft.load` into a fresh unsharded backbone must give the same outputs.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def build():
    from shared import backbones, peft
    from shared.heads import build_head

    # FSDP2 shards what each process holds (nothing is broadcast): every process must build the same
    # model, methods' random initialisation included (Lightning's seed_everything does it for a run)
    torch.manual_seed(0)
    net = backbones.create("tiny-vit")  # seeded: a fresh one has the same weights (fingerprint)
    peft.attach(net, [peft.LoRA(r=4, alpha=8, targets=["qkv"]), peft.Adapter(placement="ffn", bottleneck=8)],
                backbone_id="tiny-vit")
    model = peft.Classifier(net, build_head({"kind": "linear", "dim": backbones.anatomy(net).embed_dim,
                                             "num_classes": 3}), labels=["a", "b", "c"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "trained": LoRA's B and the adapter's up-projection start at 0 (identity)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def check(out: Path) -> dict[str, float]:
    """Every process must call it (same seed, same inputs). Returns the largest differences."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from shared import backbones, peft
    from shared.distributed import full_tensor, fully_shard_model, whole

    rank, size = dist.get_rank(), dist.get_world_size()
    model = build().eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = reference(x)
    reference(x).square().sum().backward()
    sharded = fully_shard_model(copy.deepcopy(model), mesh=init_device_mesh("cpu", (size,)))
    assert all(isinstance(p, DTensor) for p in sharded.parameters())  # every tensor sharded
    with torch.no_grad():
        out_diff = (sharded(x) - expected).abs().max().item()
    with whole(sharded), torch.no_grad():  # code that calls the backbone's submodules directly
        tokens_diff = (backbones.anatomy(sharded.backbone).forward_tokens(x).x
                       - backbones.anatomy(reference.backbone).forward_tokens(x).x).abs().max().item()
    sharded(x).square().sum().backward()  # every process the same batch: the averaged gradient is the same
    grads = dict(reference.named_parameters())
    grad_diff, missing = 0.0, []
    for name, p in sharded.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
            continue
        grad_diff = max(grad_diff, (full_tensor(p.grad) - grads[name].grad).abs().max().item())
    assert not missing, f"no gradient for {missing}"
    assert sum(p.requires_grad for p in sharded.parameters()) == sum(p.requires_grad for p in model.parameters())
    peft.save(sharded, out / "bundle")  # a collective: every process gathers, process 0 writes
    dist.barrier()
    assert (out / "bundle" / "adapter.safetensors").is_file()
    loaded = peft.load(backbones.create("tiny-vit"), out / "bundle").eval()
    with torch.no_grad():
        load_diff = (loaded(x) - expected).abs().max().item()
    if rank == 0:
        (out / "result.txt").write_text(f"{size} {out_diff} {tokens_diff} {grad_diff} {load_diff}\n")
    return {"outputs": out_diff, "tokens": tokens_diff, "gradients": grad_diff, "loaded": load_diff}


if __name__ == "__main__":  # under torchrun
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        check(Path(sys.argv[1]))
    finally:
        dist.destroy_process_group()
