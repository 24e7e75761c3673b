"""One test per patch of megatron_rl/compat/megatron_compat.py (and megatron_distopt.py).

Each test first checks that the upstream target still exists and still has the CUDA
assumption the patch removes (so the test fails if megatron-core moves or renames it), then
shows that, once applied, the patched code runs on the CPU and does the right thing.
"""
import importlib
import inspect

import pytest
import torch

from megatron_rl.compat import megatron_compat, megatron_distopt

pytestmark = pytest.mark.unit

if torch.cuda.is_available():  # the layer is CPU-only by design
    pytest.skip("megatron_compat's CPU patches apply only where CUDA is absent", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def applied():
    megatron_compat.apply()
    yield


def _mod(name):
    return importlib.import_module(name)


def _src(obj):
    return inspect.getsource(getattr(obj, "__wrapped__", obj))


def test_apply_is_idempotent_and_contained():
    assert megatron_compat.needed()
    assert megatron_compat.apply() is False  # already applied by the fixture
    for name in megatron_compat.PROXIED_MODULES:
        assert _mod(name).torch is megatron_compat._TORCH_ON_CPU, name
    # The real torch.cuda is untouched: vLLM and user code still see no CUDA.
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_patch1_triton_paged_stash_absent_or_importable():
    # 0.19's transformer/moe/ops/paged_stash.py imports triton at import time; 0.16.1 has none.
    spec = importlib.util.find_spec("megatron.core.transformer.moe.ops.paged_stash") \
        if importlib.util.find_spec("megatron.core.transformer.moe.ops") else None
    if spec is not None:
        importlib.import_module("triton")
    importlib.import_module("megatron.core.models.gpt")


def test_patch2_rng_tracker_on_cpu():
    random = _mod("megatron.core.tensor_parallel.random")
    sig = inspect.signature(random.model_parallel_cuda_manual_seed)
    assert {"seed", "tp_rank", "ep_rank", "etp_rank"} <= set(sig.parameters)
    assert "torch.cuda.manual_seed" in inspect.getsource(random.model_parallel_cuda_manual_seed)
    assert random._get_cuda_rng_state is megatron_compat._get_cpu_rng_state
    assert random._set_cuda_rng_state is megatron_compat._set_cpu_rng_state
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.get_rng_state()  # what upstream would call

    def draws():
        random.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
        outside0 = torch.rand(3)
        with random.get_cuda_rng_tracker().fork():
            a = torch.rand(3)
        with random.get_cuda_rng_tracker().fork():
            b = torch.rand(3)
        return outside0, a, b, torch.rand(3)

    o0, a, b, o1 = draws()
    o0_, a_, b_, o1_ = draws()
    assert torch.equal(a, a_) and torch.equal(b, b_) and torch.equal(o1, o1_)  # reproducible
    assert not torch.equal(a, b)  # the tracked state advances
    torch.manual_seed(123)  # data-parallel seed = seed: the default stream is not disturbed by forks
    ref = torch.rand(3), torch.rand(3)
    assert torch.equal(o0, ref[0]) and torch.equal(o1, ref[1])


def test_patch3_current_device_resolves_to_cpu():
    p2p = _mod("megatron.core.pipeline_parallel.p2p_communication")
    assert "device=torch.cuda.current_device()" in inspect.getsource(p2p)
    assert p2p.torch.cuda.current_device() == torch.device("cpu")
    t = p2p.torch.empty((3,), device=p2p.torch.cuda.current_device(), dtype=torch.int64)
    assert t.device.type == "cpu"


def test_patch4_synchronize_is_noop():
    p2p = _mod("megatron.core.pipeline_parallel.p2p_communication")
    assert "torch.cuda.synchronize()" in inspect.getsource(p2p)
    assert p2p.torch.cuda.synchronize() is None


def test_patch5_hardcoded_cuda_device_and_pinning():
    schedules = _mod("megatron.core.pipeline_parallel.schedules")
    assert 'device="cuda"' in inspect.getsource(schedules.forward_backward_no_pipelining)
    z = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert z.device.type == "cpu"
    utils = _mod("megatron.core.transformer.utils")
    assert 'device="cuda"' in inspect.getsource(utils)
    mask = utils.get_default_causal_mask(4)
    assert torch.equal(mask, torch.triu(torch.ones(4, 4), diagonal=1).bool())
    # rope's CP index: pin_memory=True + Tensor.cuda() removed from the function's source.
    rope = _mod("megatron.core.models.common.embeddings.rope_utils")
    assert ".cuda(non_blocking=True)" in _src(rope.get_pos_emb_on_this_cp_rank)

    class FakeCP:
        def size(self):
            return 2

        def rank(self):
            return 1

    emb = torch.arange(8.0).view(8, 1, 1, 1)  # (S, 1, 1, d)
    got = rope.get_pos_emb_on_this_cp_rank(emb, 0, FakeCP())
    assert got.flatten().tolist() == [2.0, 3.0, 4.0, 5.0]  # chunks 1 and 2 of 4
    lm = _mod("megatron.core.models.common.language_module.language_module")
    assert "weight.data.cuda()" in _src(lm.LanguageModule.setup_embeddings_and_output_layer)
    assert lm.LanguageModule.setup_embeddings_and_output_layer.__wrapped__ is not None  # rewritten


def test_patch6_ddp_streams_and_events():
    ddp = _mod("megatron.core.distributed.distributed_data_parallel")
    buf = _mod("megatron.core.distributed.param_and_grad_buffer")
    assert "torch.cuda.Stream(" in inspect.getsource(ddp)
    src = inspect.getsource(buf)
    assert "torch.cuda.default_stream()" in src and "torch.cuda.stream(" in src
    s = ddp.torch.cuda.Stream(device=ddp.torch.cuda.current_device())
    s.wait_stream(buf.torch.cuda.default_stream())
    buf.torch.cuda.default_stream().wait_stream(s)
    with buf.torch.cuda.stream(s):
        x = torch.ones(2) * 2
    e = ddp.torch.cuda.Event()
    e.record()
    e.wait()
    assert x.sum().item() == 4.0 and e.query()


def test_patch7_torch_norm_allows_sequence_parallel_and_tags_params():
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch_norm = _mod("megatron.core.transformer.torch_norm")
    patched = torch_norm.WrappedTorchNorm
    original = patched.__wrapped__
    assert "sequence parallel not supported" in inspect.getsource(original)
    for modname, attr in (("megatron.core.models.backends", "WrappedTorchNorm"),
                          ("megatron.core.transformer.transformer_block", "LayerNormImpl")):
        assert getattr(_mod(modname), attr) is patched, (modname, attr)
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                            tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True)
    with pytest.raises(AssertionError, match="sequence parallel"):
        original(cfg, 8, eps=1e-6)
    norm = patched(cfg, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and cfg.sequence_parallel
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    x = torch.randn(3, 8)
    assert torch.allclose(norm(x), torch.nn.functional.rms_norm(x, (8,), norm.weight, 1e-6))


def test_patch8_cuda_tensor_type_strings():
    clip = _mod("megatron.core.optimizer.clip_grads")
    opt = _mod("megatron.core.optimizer.optimizer")
    assert "'torch.cuda.FloatTensor'" in _src(clip.clip_grad_by_total_norm_fp32)
    assert opt.clip_grad_by_total_norm_fp32 is clip.clip_grad_by_total_norm_fp32  # rebound where imported
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    clip.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    distrib = _mod("megatron.core.optimizer.distrib_optimizer")
    for fn in (distrib.DistributedOptimizer._build_model_and_main_param_groups,
               distrib.DistributedOptimizer.__init__, opt.Float16OptimizerWithFloat16Params.__init__):
        fn = getattr(fn, "__func__", fn)
        assert "torch.cuda." in _src(fn) and fn.__wrapped__ is not None


def test_rewrite_function_fails_loudly_when_upstream_moves():
    clip = _mod("megatron.core.optimizer.clip_grads")
    with pytest.raises(RuntimeError, match="no longer contains"):
        megatron_compat.rewrite_function(clip, "count_zeros_fp32", [("this text is not there", "")])


def test_patch9_distributed_optimizer_torch_adam_state():
    distrib = _mod("megatron.core.optimizer.distrib_optimizer")
    cls = distrib.DistributedOptimizer
    save_src, load_src = _src(cls.state_dict), _src(cls.load_state_dict)
    assert "assert len(steps) == 1" in save_src  # fails on a fresh optimizer (no state)
    assert 's["step"] = step' in load_src  # one step tensor shared by every param
    assert getattr(cls.state_dict, megatron_compat._MARK) and getattr(cls.load_state_dict, megatron_compat._MARK)
    w = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    adam = torch.optim.Adam(w, lr=0.1)
    megatron_distopt._init_adam_state(adam)
    steps = [adam.state[p]["step"] for p in w]
    assert all(s.item() == 0 for s in steps) and steps[0] is not steps[1]
    # The pre-created state gives exactly the lazily-initialised update.
    ref = [torch.nn.Parameter(p.detach().clone()) for p in w]
    ref_adam = torch.optim.Adam(ref, lr=0.1)
    for params, o in ((w, adam), (ref, ref_adam)):
        for p in params:
            p.grad = torch.ones(3)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(w, ref))
    shared = torch.tensor(5.0)
    for p in w:
        adam.state[p]["step"] = shared
    megatron_distopt._unshare_steps(adam)
    assert adam.state[w[0]]["step"] is not adam.state[w[1]]["step"]
    assert adam.state[w[0]]["step"].item() == 5.0


def test_patches_7_and_11_are_applied_on_gpu_too(monkeypatch):
    """GPU runs without Transformer Engine use megatron's local spec, whose norm refuses sequence
    parallel, and the MoE router's GEMM without TE: init_distributed applies patches 7 and 11 on
    every device, the CPU patches only without CUDA."""
    calls = []
    monkeypatch.setattr(megatron_compat, "apply_sequence_parallel_norm", lambda: calls.append("norm") or True)
    monkeypatch.setattr(megatron_compat, "apply_te_general_gemm", lambda: calls.append("gemm") or True)
    monkeypatch.setattr(megatron_compat, "apply", lambda **k: calls.append("cpu") or True)
    assert megatron_compat.apply_for(cuda=True) == ["sequence_parallel_norm", "te_general_gemm"]
    assert calls == ["norm", "gemm"]
    calls.clear()
    assert megatron_compat.apply_for(cuda=False) == ["sequence_parallel_norm", "te_general_gemm", "cpu"]
    assert calls == ["norm", "gemm", "cpu"]
    from megatron_rl import parallel

    assert "megatron_compat.apply_for(cuda=torch.cuda.is_available())" in inspect.getsource(parallel.init_distributed)


def test_patch10_moe_modules_get_the_cpu_torch():
    td = _mod("megatron.core.transformer.moe.token_dispatcher")
    assert "torch.cuda.Stream()" in inspect.getsource(td.MoEAlltoAllTokenDispatcher.__init__)
    router = _mod("megatron.core.transformer.moe.router")
    assert "torch.cuda.current_device()" in inspect.getsource(router.Router.gating)
    assert td.torch is not torch and router.torch is not torch
    td.torch.cuda.Stream().wait_stream(td.torch.cuda.current_stream())  # the null stream, no CUDA
    assert torch.ones(1).to(device=router.torch.cuda.current_device()).device.type == "cpu"


def test_patch11_router_gemm_without_te():
    moe_utils = _mod("megatron.core.transformer.moe.moe_utils")
    assert "te_general_gemm is not None" in inspect.getsource(moe_utils.RouterGatingLinearFunction.forward)
    assert moe_utils.HAVE_TE is False and moe_utils.te_general_gemm is None
    assert megatron_compat.apply_te_general_gemm() is False  # defined now: idempotent, and TE's would be kept
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    assert torch.allclose(out, x @ w.t())  # independent: the plain product


def test_patch12_split_sizes_become_numpy_on_cpu():
    import numpy as np

    moe_utils = _mod("megatron.core.transformer.moe.moe_utils")
    td = _mod("megatron.core.transformer.moe.token_dispatcher")
    original = moe_utils.maybe_move_tensor_to_cpu.__wrapped__
    assert "tensor.is_cuda" in inspect.getsource(original)
    assert torch.is_tensor(original(torch.tensor([1, 2]), as_numpy=True))  # the upstream behaviour on CPU
    assert td.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu  # rebound where it is used
    got = td.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert isinstance(got, np.ndarray) and got.tolist() == [1, 2]
    assert torch.is_tensor(td.maybe_move_tensor_to_cpu(torch.tensor([3])))  # as_numpy=False: unchanged


def _uneven_worker(rank: int, world: int, init: str, out: dict) -> None:
    import torch.distributed as dist

    from megatron_rl.parallel.collectives import gather_uneven, reduce_scatter_uneven

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    sizes = [2, 5, 1][:world]
    mine = torch.full((sizes[rank], 3), float(rank + 1))
    gathered = gather_uneven(mine, sizes, group=dist.group.WORLD)
    x = torch.arange(sum(sizes) * 3, dtype=torch.float32).view(-1, 3) * (rank + 1)
    scattered = reduce_scatter_uneven(x, sizes, group=dist.group.WORLD)
    out[rank] = (gathered.tolist(), scattered.tolist())
    dist.destroy_process_group()


def test_patch13_uneven_gathers_over_gloo(tmp_path):
    """Three gloo processes with 2, 5 and 1 rows: the gather is every rank's rows in rank order,
    the reduce-scatter each rank's own rows summed over ranks (expected values by hand); and
    megatron-core still gathers with list collectives (the cause, upstream)."""
    import torch.multiprocessing as mp

    world, sizes = 3, [2, 5, 1]
    out = mp.Manager().dict()
    mp.spawn(_uneven_worker, args=(world, f"file://{tmp_path / 'store'}", out), nprocs=world, join=True)
    want_gather = [[float(r + 1)] * 3 for r in range(world) for _ in range(sizes[r])]
    base = torch.arange(sum(sizes) * 3, dtype=torch.float32).view(-1, 3) * sum(range(1, world + 1))
    starts = [0, 2, 7]
    for r in range(world):
        assert out[r][0] == want_gather
        assert out[r][1] == base[starts[r]:starts[r] + sizes[r]].tolist()
    mappings = _mod("megatron.core.tensor_parallel.mappings")
    assert "torch.distributed.all_gather(output_tensor_list" in inspect.getsource(mappings._gather_along_first_dim.__wrapped__)
    assert "torch.distributed.reduce_scatter(output" in inspect.getsource(
        mappings._reduce_scatter_along_first_dim.__wrapped__)
