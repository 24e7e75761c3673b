"""Tier 1: WeightSync in one process: exact shards, checksums, and bad input before any byte moves."""
import pytest
import torch

from megatron_rl.models.tiny import tiny_hf_config
from megatron_rl.parallel.grid import RankGrid
from megatron_rl.models.shape import ModelShape
from megatron_rl.resharding.layout import assemble, megatron_layout
from megatron_rl.resharding.sync import WeightSync
from megatron_rl.resharding.transport import WeightSyncError
from megatron_rl.resharding.vllm_layout import vllm_layout

pytestmark = pytest.mark.unit


class FakeModel:
    """Anything with ``named_parameters()`` is a model chunk to WeightSync."""

    def __init__(self, tensors):
        self.tensors = tensors

    def named_parameters(self):
        return iter(self.tensors.items())


class Engine:
    def __init__(self, shapes=None):
        self.shapes, self.got, self.calls = shapes, {}, []

    def shard_shapes(self):
        return self.shapes

    def begin_weight_update(self):
        self.calls.append("begin")

    def load_shards(self, shards, *, donate=False):
        for n, t in shards:
            self.got[n] = t.clone()

    def end_weight_update(self):
        self.calls.append("end")


class NoTransport:
    """A single-rank plan is all local copies: the transport must never carry bytes."""

    def start(self, sends, recvs):
        assert not sends and not recvs
        return []

    def wait(self, handle):
        pass


def _setup(family="qwen3", tied=False, **over):
    shape = ModelShape.from_hf_config(tiny_hf_config(family, tied=tied, **over))
    g = torch.Generator().manual_seed(0)
    canon = {n: torch.randn(s, generator=g) for n, s in shape.canonical_shapes().items()}
    src = megatron_layout(shape, RankGrid(world_size=1))
    model = FakeModel({"module." + n: assemble(lt, lambda c, d, s, k: canon[c].narrow(d, s, k))
                       for n, lt in src.ranks[0].items()})
    dst = vllm_layout(shape, tp=1, world_size=1)
    return shape, canon, src, dst, model


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("qwen3", False)])
def test_single_rank_sync_is_exact_and_verified(family, tied):
    _, canon, src, dst, model = _setup(family, tied)
    eng = Engine({n: lt.shape for n, lt in dst.ranks[0].items()})
    ws = WeightSync([model], eng, src_layout=src, dst_layout=dst, bucket_bytes=8192, rank=0,
                    transport=NoTransport(), verify=True)
    stats = ws.sync()
    assert eng.calls == ["begin", "end"] and stats.bytes_sent == 0
    for n, lt in dst.ranks[0].items():
        assert torch.equal(eng.got[n], assemble(lt, lambda c, d, s, k: canon[c].narrow(d, s, k))), n
    assert ws.verify() == ws.plan.num_ops
    # Shards larger than a bucket are staged whole (the engine takes whole shards).
    biggest = max(t.numel() * 4 for t in eng.got.values())
    assert stats.peak_extra_bytes <= 2 * biggest + 2 * 8192  # the shard finishing + the next
    # Buckets that hold any shard: staging + buffers never exceed two buckets (double buffering).
    ws2 = WeightSync([model], Engine(), src_layout=src, dst_layout=dst, bucket_bytes=biggest, rank=0,
                     transport=NoTransport())
    peak = ws2.sync().peak_extra_bytes
    assert biggest <= peak <= 2 * biggest, (peak, biggest)


def test_verify_catches_a_corrupted_slice():
    _, _, src, dst, model = _setup()
    eng = Engine()
    ws = WeightSync([model], eng, src_layout=src, dst_layout=dst, bucket_bytes=8192, rank=0, transport=NoTransport())
    ws.sync(verify=True)
    k = next(i for i, v in ws.last_stats.dst_sums.items())
    ws.last_stats.dst_sums[k] += 1
    with pytest.raises(WeightSyncError, match=r"weight sync verify: rank 0 parameter .* differs from its source"):
        ws.verify()


def test_training_shape_mismatch_raises_before_any_byte_moves():
    _, _, src, dst, model = _setup()
    model.tensors["module.decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(3, 7)
    eng = Engine()
    with pytest.raises(WeightSyncError, match=r"'decoder.layers.1.mlp.linear_fc2.weight' has shape \(3, 7\)"):
        WeightSync([model], eng, src_layout=src, dst_layout=dst, bucket_bytes=8192, rank=0, transport=NoTransport())
    assert eng.calls == []


def test_rollout_model_mismatch_raises_before_any_byte_moves():
    _, _, src, _, model = _setup()
    ffn = ModelShape.from_hf_config(tiny_hf_config("qwen3")).ffn
    wide = ModelShape.from_hf_config(tiny_hf_config("qwen3", intermediate_size=2 * ffn))
    eng = Engine()
    with pytest.raises(WeightSyncError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight"):
        WeightSync([model], eng, src_layout=src, dst_layout=vllm_layout(wide, tp=1, world_size=1), bucket_bytes=8192,
                   rank=0, transport=NoTransport())
    tied_dst = vllm_layout(ModelShape.from_hf_config(tiny_hf_config("qwen3", tied=True)), tp=1, world_size=1)
    untied = vllm_layout(ModelShape.from_hf_config(tiny_hf_config("qwen3")), tp=1, world_size=1)
    live = Engine({n: lt.shape for n, lt in untied.ranks[0].items()})  # the engine runs the untied model
    with pytest.raises(WeightSyncError, match=r"vLLM parameter 'lm_head.weight' is not produced by the plan"):
        WeightSync([model], live, src_layout=src, dst_layout=tied_dst, bucket_bytes=8192, rank=0,
                   transport=NoTransport())
    live.shapes["model.norm.weight"] = (7,)
    with pytest.raises(WeightSyncError, match=r"rollout parameter 'model.norm.weight' has shape \(7,\)"):
        WeightSync([model], live, src_layout=src, dst_layout=untied, bucket_bytes=8192, rank=0, transport=NoTransport())
    assert eng.calls == [] and live.calls == []


def test_gloo_coalescing_round_trips_every_slice_in_plan_order():
    """Sends to one peer travel as one flat message; the receiver, listing its receives in the
    same (plan) order, scatters it back exactly. Two dtypes to one peer stay two messages."""
    import torch

    from megatron_rl.resharding.transport import Transfer, _by_peer, _coalesce

    g = torch.Generator().manual_seed(0)
    src = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 2, generator=g).double(),
           torch.randn(7, generator=g)]
    sends = [Transfer(1, t, i, f"p{i}") for i, t in enumerate(src)] + [Transfer(2, torch.ones(3), 9, "other")]
    recvs = [Transfer(0, torch.empty_like(t), i, f"p{i}") for i, t in enumerate(src)]
    out_s = [_coalesce(items, fill=True) for items in _by_peer(sends)]
    out_r = [_coalesce(items, fill=False) for items in _by_peer(recvs)]
    assert [(t.peer, t.tensor.dtype, t.tensor.numel()) for t, _ in out_s] == \
        [(1, torch.float32, 24), (1, torch.float64, 4), (2, torch.float32, 3)]
    assert out_s[2][1] is None and out_s[2][0] is sends[-1]  # a lone contiguous tensor goes as is
    for (sent, _), (got, unpack) in zip(out_s, out_r):  # "the network": the flat buffers match up
        got.tensor.copy_(sent.tensor)
        flat, parts = unpack if unpack is not None else (got.tensor.view(-1), [])
        for t, off in parts:
            t.tensor.view(-1).copy_(flat[off:off + t.tensor.numel()])
    for t, r in zip(src, recvs):
        assert torch.equal(t, r.tensor)


def test_te_named_model_syncs_bitwise():
    """Under Transformer Engine the norms sit in the next linear (``linear_qkv.layer_norm_weight``);
    the trainer's source layout must follow the built model's names, and the sync stays exact."""
    from megatron_rl import trainer
    from megatron_rl.resharding.layout import megatron_rank_tensors

    shape, canon, _, dst, _ = _setup("qwen3")
    grid = RankGrid(world_size=1)
    te = megatron_rank_tensors(shape, tp=1, pp=1, tp_rank=0, pp_rank=0, te_names=True)
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in te)  # the stand-in carries TE's names
    model = FakeModel({"module." + n: assemble(lt, lambda c, d, s, k: canon[c].narrow(d, s, k)) for n, lt in te.items()})
    with pytest.raises(WeightSyncError, match="in the layout but not in the model"):  # the name-blind layout
        WeightSync([model], Engine(), src_layout=megatron_layout(shape, grid), dst_layout=dst, rank=0,
                   transport=NoTransport())
    eng = Engine({n: lt.shape for n, lt in dst.ranks[0].items()})
    ws = WeightSync([model], eng, src_layout=trainer.sync_source_layout([model], shape, grid, 128), dst_layout=dst,
                    bucket_bytes=8192, rank=0, transport=NoTransport(), verify=True)
    ws.sync()
    for n, lt in dst.ranks[0].items():
        assert torch.equal(eng.got[n], assemble(lt, lambda c, d, s, k: canon[c].narrow(d, s, k))), n
    assert ws.verify() == ws.plan.num_ops
