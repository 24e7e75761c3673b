"""One place for collectives: package code calls torch.distributed collectives only through
megatron_rl/parallel/collectives.py, and every tensor it hands over lives on its group's device.

The device rule is checked on CPU by pretending the default group is NCCL on a stand-in device
("meta"): each former offender must hand a tensor on that device to the collective, which a
host tensor (the old code) does not.
"""
import ast
import os
import types

import pytest
import torch

from megatron_rl.parallel import collectives as coll

pytestmark = pytest.mark.unit

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_rl")
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "reduce", "gather", "scatter", "all_gather_object", "broadcast_object_list",
               "gather_object", "scatter_object_list", "barrier", "monitored_barrier", "send", "recv", "isend",
               "irecv", "batch_isend_irecv", "P2POp", "all_to_all", "all_to_all_single"}


def collective_calls(source: str) -> list:
    """(line, name) of every torch.distributed collective used in ``source``."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}  # names bound to torch.distributed
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed":
                    aliases.add(a.asname or "torch.distributed")
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch" and any(a.name == "distributed" for a in node.names):
                aliases.update(a.asname or "distributed" for a in node.names if a.name == "distributed")
            if node.module == "torch.distributed":
                hits += [(node.lineno, a.name) for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            if ast.unparse(node.value) in aliases:
                hits.append((node.lineno, node.attr))
    return hits


def test_package_calls_collectives_only_through_one_module():
    offenders = []
    for root, _, files in os.walk(PKG):
        for f in files:
            path = os.path.join(root, f)
            if not f.endswith(".py") or path.endswith(os.path.join("parallel", "collectives.py")):
                continue
            for line, name in collective_calls(open(path).read()):
                offenders.append(f"{os.path.relpath(path, PKG)}:{line} {name}")
    assert not offenders, "collectives outside megatron_rl/parallel/collectives.py:\n" + "\n".join(offenders)
    # the wrapper module itself is seen by the scanner (the scan is not blind)
    assert len(collective_calls(open(os.path.join(PKG, "parallel", "collectives.py")).read())) >= 10


@pytest.mark.parametrize("src", [
    "import torch.distributed as dist\ndist.all_reduce(x)\n",
    "import torch\ntorch.distributed.broadcast(x, src=0)\n",
    "from torch import distributed as d\nd.barrier()\n",
    "from torch.distributed import isend\n",
])
def test_scanner_catches_planted_calls(src):
    assert collective_calls(src), src


def test_scanner_ignores_non_collectives():
    assert not collective_calls("import torch.distributed as dist\ndist.get_rank(); dist.new_group()\n")


@pytest.fixture
def fake_nccl(monkeypatch):
    """The default group 'is NCCL' and its device is 'meta'; collectives record what they get."""
    seen = []
    monkeypatch.setattr(coll.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(coll, "device_for_backend",
                        lambda b: torch.device("meta") if b == "nccl" else torch.device("cpu"))

    class Reached(Exception):
        pass

    def record(name):
        def fn(t, *a, **k):
            seen.append((name, t.device.type))
            raise Reached(name)  # stop here: a meta tensor has no values to read back
        return fn

    for name in ("all_reduce", "broadcast", "isend", "irecv"):
        monkeypatch.setattr(coll.dist, name, record(name))
    return types.SimpleNamespace(seen=seen, Reached=Reached)


def test_check_on_device_names_group_and_fix(fake_nccl):
    with pytest.raises(coll.CollectiveDeviceError, match="needs meta; fix: create it with"):
        coll.all_reduce(torch.zeros(2))  # a host tensor into an NCCL group
    assert fake_nccl.seen == []


def _one_rank_topology():
    from megatron_rl.parallel.grid import RankGrid
    from megatron_rl.parallel.topology import Topology

    return Topology.pure(RankGrid(world_size=1), rank=0)  # groups None: the default (fake NCCL) group


def test_reduce_loss_hands_the_group_device(fake_nccl):
    from megatron_rl.train import engine

    with pytest.raises(fake_nccl.Reached):
        engine.reduce_loss([{"loss_sum": 1.0, "tokens": 3}], topo=_one_rank_topology())
    assert fake_nccl.seen == [("all_reduce", "meta")]


def test_trainer_sums_hand_the_group_device(fake_nccl):
    from megatron_rl.train import rl_step

    with pytest.raises(fake_nccl.Reached):
        rl_step.global_sums(torch.zeros(4, dtype=torch.float64), topo=_one_rank_topology(), maximum=0.5)
    assert fake_nccl.seen == [("all_reduce", "meta")]


def test_checkpoint_agreement_hands_the_group_device(fake_nccl):
    from megatron_rl.checkpoint import rl

    with pytest.raises(fake_nccl.Reached):
        rl._all_ok(True, what="x")
    assert fake_nccl.seen == [("all_reduce", "meta")]


def test_sync_verify_hands_the_group_device(fake_nccl, monkeypatch):
    from megatron_rl.resharding import sync

    monkeypatch.setattr(coll.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(coll.dist, "get_world_size", lambda group=None: 2)
    ws = object.__new__(sync.WeightSync)
    ws.group, ws.rank = None, 0
    ws.last_stats = types.SimpleNamespace(src_sums={0: 5}, dst_sums={0: 5})
    ws.plan = types.SimpleNamespace(num_ops=1, buckets=[[]])
    with pytest.raises(fake_nccl.Reached):
        ws.verify()
    assert fake_nccl.seen == [("all_reduce", "meta")]


def test_checksum_weights_live_on_the_tensor_device():
    from megatron_rl.resharding.executor import checksum

    t = torch.arange(10, dtype=torch.float32)
    expect = sum(int(b) * ((i % 8191) + 1) for i, b in enumerate(t.view(torch.int32).tolist())) % (1 << 61)
    assert checksum(t) == expect
    # On meta the product is formed (the weights followed the tensor) and only reading it fails;
    # host weights times a device tensor fail earlier, with a device mismatch.
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        checksum(torch.empty(10, device="meta"))


def test_hf_export_receives_on_the_group_device(fake_nccl, monkeypatch):
    """The export's move (the plan Megatron -> HF run by the sync executor) stages and receives
    on the group's device: rank 0 of a TP2 layout receives rank 1's half of every split tensor."""
    from megatron_rl.checkpoint import spmd
    from megatron_rl.parallel.grid import RankGrid
    from megatron_rl.models.shape import ModelShape
    from megatron_rl.resharding.layout import hf_layout, megatron_layout, megatron_rank_tensors

    monkeypatch.setattr(coll.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(coll.dist, "P2POp", lambda fn, t, peer, group=None, tag=0: (fn, t))

    def batch(ops):
        fake_nccl.seen.extend(("irecv" if fn is coll.dist.irecv else "isend", t.device.type) for fn, t in ops)
        raise fake_nccl.Reached("batch_isend_irecv")
    monkeypatch.setattr(coll.dist, "batch_isend_irecv", batch)
    shape = ModelShape(hidden=32, heads=2, kv_heads=2, head_dim=16, ffn=64, layers=1, vocab=128)
    layout = megatron_layout(shape, RankGrid(world_size=2, tp=2, pp=1, cp=1))
    params = {n: torch.zeros(lt.shape) for n, lt in megatron_rank_tensors(shape, tp=2, pp=1, tp_rank=0, pp_rank=0).items()}
    with pytest.raises(fake_nccl.Reached):
        spmd.move(layout, params, dst=hf_layout(shape, rank=0), deliver=lambda n, t: None, dtype=torch.float32)
    assert fake_nccl.seen and {d for _, d in fake_nccl.seen} == {"meta"}, fake_nccl.seen
    assert {name for name, _ in fake_nccl.seen} == {"irecv"}  # rank 0 only receives: it is the HF rank
