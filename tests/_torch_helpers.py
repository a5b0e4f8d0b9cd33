"""Helpers for tests/test_torch*.py (not a conftest: the lead owns conftest.py)."""
import os
import socket


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- distributed workers (module level so torch.multiprocessing.spawn can pickle them) --------

def make_mlp(seed=0):
    import torch
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def make_data(seed=1, n=16):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def make_bag(seed=0):
    import torch
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.EmbeddingBag(50, 16, mode="mean", sparse=True),
                               torch.nn.Linear(16, 4))


def make_bag_data(seed=2, n=16):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (n, 6), generator=g), torch.randint(0, 4, (n,), generator=g)


def _train(model, x, y, steps, lr, weight_decay):
    """Step fastadam.torch.AdamW ``steps`` times on the whole batch; final parameters."""
    import torch

    from fastadam.torch import AdamW
    opt = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train_single_mixed(steps, lr=1e-2):
    """Reference for the bag model (sparse embedding + dense head), one process."""
    ids, y = make_bag_data()
    return _train(make_bag(), ids, y, steps, lr, weight_decay=0.0)


def train_single(steps, lr=1e-2):
    """Reference: one process, the whole batch, fastadam.torch.AdamW."""
    x, y = make_data()
    return _train(make_mlp(), x, y, steps, lr, weight_decay=0.1)


def _train_ddp(model, opt, x, y, steps):
    import torch
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def ddp_worker(rank, world, port, steps, out_dir, lr=1e-2):
    """DDP with plain fastadam AdamW, DDP with ZeroRedundancyOptimizer(fastadam AdamW),
    and DDP of a model with sparse embedding gradients (mixed fastadam AdamW)."""
    import faulthandler
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastadam.torch import AdamW
    faulthandler.dump_traceback_later(75, exit=True)   # a hang prints its stack and exits
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        x, y = make_data()
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]  # equal halves: mean of means
        model = DDP(make_mlp())
        opt = AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        _train_ddp(model, opt, xs, ys, steps)
        results["ddp"] = [p.detach().clone() for p in model.module.parameters()]
        del model, opt

        model = DDP(make_mlp())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=AdamW, lr=lr,
                                      weight_decay=0.1)
        _train_ddp(model, opt, xs, ys, steps)
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            results["zero_state_steps"] = sorted(
                float(st["step"]) for st in opt.state_dict()["state"].values())
        results["zero"] = [p.detach().clone() for p in model.module.parameters()]
        del model, opt

        # sparse gradients are all-reduced by gloo
        ids, yb = make_bag_data()
        model = DDP(make_bag())
        opt = AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        _train_ddp(model, opt, ids.chunk(world)[rank], yb.chunk(world)[rank], steps)
        results["mixed"] = [p.detach().clone() for p in model.module.parameters()]
        del model, opt
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    faulthandler.cancel_dump_traceback_later()
