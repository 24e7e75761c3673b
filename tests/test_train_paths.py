"""Tier 1 (+ one GPU test): the pieces behind ``algorithm.kl_coef > 0`` and ``train.shared_prefix=false``.

- the reference model's offload store: on CPU, offloading gives the parameters' bytes back to
  the OS (RSS) and onloading restores them bitwise; the file layout is aligned;
- the in-place store (the critic under the distributed optimizer): views of an offloaded buffer
  stay its views, its bytes go back to the OS and come back bitwise (on CPU, and on CUDA);
- naive micro-batches: the same responses, targets and advantages under the same keys as
  shared-prefix packing, at the naive token count ``G*P + sum(R_i)``.
"""
import pytest
import torch

from megatron_rl.attention.packing import Group, group_tokens, naive_tokens
from megatron_rl.attention.step import make_batches, split_responses
from megatron_rl.rollout.cpu_memory import rss_bytes
from megatron_rl.train.reference import FileMappedStore, InPlaceStore, PinnedHostStore, file_offsets, make_store

pytestmark = pytest.mark.unit


def _model(device="cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 2048, bias=False),
                            torch.nn.LayerNorm(2048)).to(device)  # 12.6M params: 48 MiB in fp32
    m[2].to(torch.bfloat16)  # a second dtype in the same file
    return m


def test_file_offsets_are_aligned():
    params = [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(5), torch.zeros(0), torch.zeros(2, dtype=torch.float64)]
    spans, total = file_offsets(params, align=64)
    assert spans == [(0, 6), (64, 20), (128, 0), (128, 16)] and total == 144


def test_cpu_offload_frees_the_bytes_and_onload_is_bitwise(tmp_path):
    m = _model()
    x = torch.randn(8, 1024)
    with torch.no_grad():
        want = m[2](m[1](m[0](x)).to(torch.bfloat16))
    params = list(m.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    store = make_store(params, path=str(tmp_path / "ref.bin"))
    assert isinstance(store, FileMappedStore) and (tmp_path / "ref.bin").stat().st_size == store.nbytes >= nbytes
    store.offload()  # first offload: frees the original (anonymous) copy
    assert all(p.numel() == 0 for p in params)
    drops, rises = [], []
    for _ in range(2):  # any number of cycles
        before = rss_bytes()
        store.onload()
        rises.append(rss_bytes() - before)
        with torch.no_grad():
            got = m[2](m[1](m[0](x)).to(torch.bfloat16))
        assert torch.equal(got, want)  # the file's bytes: bitwise the same
        before = rss_bytes()
        store.offload()
        drops.append(before - rss_bytes())
    # 48 MiB out of and back into this process's RSS, to within 1% (the first cycle's onload
    # also saw some unrelated heap growth: measured +2.6%)
    assert all(0.99 <= d / nbytes <= 1.01 for d in drops) and 0.99 <= rises[-1] / nbytes <= 1.01, (drops, rises, nbytes)


def test_naive_batches_match_shared_prefix_batches():
    groups = [Group(prompt=[5, 6, 7], responses=[[8, 9], [10], []], advantages=[0.5, -1.0, 0.0]),
              Group(prompt=[11], responses=[[12, 13, 14], [15, 16]], advantages=[[1.0, 2.0, 3.0], -0.5])]
    singles, keys = split_responses(groups)
    assert keys == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert [list(s.prompt) for s in singles] == [[5, 6, 7]] * 3 + [[11]] * 2
    per_key = {}
    for shared in (True, False):
        batches = make_batches(groups, max_tokens=12, shared_prefix=shared)
        rows = {}
        for b in batches:
            local = b["locals"][0]
            for key, t, a in zip(local.response_keys, local.split_responses(local.targets),
                                 local.split_responses(local.advantages)):
                rows[tuple(key)] = (t.tolist(), a.tolist())
        per_key[shared] = rows
        tokens = sum(int((b["locals"][0].global_index >= 0).sum()) for b in batches)
        assert tokens == sum((group_tokens if shared else naive_tokens)(g) for g in groups), shared
    assert per_key[True] == per_key[False] and len(per_key[False]) == 5
    assert per_key[False][(1, 0)] == ([12, 13, 14], [1.0, 2.0, 3.0])


@pytest.mark.gpu
def test_cuda_offload_frees_device_memory_and_onload_is_bitwise():
    m = _model("cuda")
    x = torch.randn(8, 1024, device="cuda")
    with torch.no_grad():
        want = m[2](m[1](m[0](x)).to(torch.bfloat16))
    params = list(m.parameters())
    store = make_store(params, path="unused")
    assert isinstance(store, PinnedHostStore) and all(h.is_pinned() for h in store.host)
    before = torch.cuda.memory_allocated()
    store.offload()
    assert before - torch.cuda.memory_allocated() >= 0.99 * store.nbytes
    store.onload()
    with torch.no_grad():
        assert torch.equal(m[2](m[1](m[0](x)).to(torch.bfloat16)), want)


@pytest.mark.gpu
def test_cuda_store_is_refilled_in_place_when_the_weights_change():
    """The critic's offloads: the same pinned buffers take the new bytes; a changed tensor set
    gets a new store."""
    m = _model("cuda")
    params = list(m.parameters())
    store = make_store(params, path="unused")
    ptrs = [h.data_ptr() for h in store.host]
    store.offload()
    store.onload()
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # an optimizer step
    want = [p.detach().cpu().clone() for p in params]
    again = make_store(params, path="unused", reuse=store)
    assert again is store and [h.data_ptr() for h in store.host] == ptrs  # no new pinned memory
    store.offload()
    store.onload()
    assert all(torch.equal(p.cpu(), w) for p, w in zip(params, want))  # the new bytes, not the first copy
    extra = params + [torch.zeros(3, device="cuda")]  # Adam's state appeared: another set
    assert make_store(extra, path="unused", reuse=store) is not store


def _buffer_and_views(device="cpu"):
    """A flat buffer (32 MiB fp32) and views of it, as DDP's param_data, its parameters and a
    distributed-optimizer shard of one of them."""
    buf = torch.randn(1 << 23, generator=torch.Generator().manual_seed(3)).to(device)
    weight, bias = buf[:4096].view(64, 64), buf[4096:6144]
    return buf, weight, bias, bias[100:600]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_in_place_store_keeps_views_and_returns_memory(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    buf, weight, bias, shard = _buffer_and_views(device)
    want = buf.clone().cpu()
    store = InPlaceStore([buf], path=str(tmp_path / "flat.bin"))
    before = rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
    store.offload()
    after = rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
    assert buf.untyped_storage().nbytes() == 0
    assert 0.9 <= (before - after) / (buf.numel() * 4) <= 1.1, (before, after)
    for _ in range(2):  # any number of cycles
        store.onload()
        assert torch.equal(buf.cpu(), want)
        store.offload()
    store.onload()
    with torch.no_grad():
        shard.fill_(7.0)  # an optimizer step on the shard reaches the parameter and the buffer
    assert torch.all(bias[100:600] == 7.0) and torch.all(buf[4196:4696] == 7.0)
    assert torch.equal(weight.cpu(), want[:4096].view(64, 64))
    with pytest.raises(ValueError, match="whole storage"):
        InPlaceStore([bias], path=str(tmp_path / "view.bin"))


def test_a_re_pointing_store_cuts_the_views(tmp_path):
    """Negative control: the parameter stores re-point ``.data``, so a view of the buffer taken
    before an offload is no longer a view of it after onload. This is why the critic under the
    distributed optimizer needs the in-place store."""
    buf, _, bias, _ = _buffer_and_views()
    store = make_store([buf], path=str(tmp_path / "flat.bin"))
    store.offload()
    store.onload()
    with torch.no_grad():
        bias.fill_(7.0)
    assert not torch.any(buf[4096:6144] == 7.0)


def test_reference_config_errors_name_the_field(tmp_path):
    """kl_coef > 0 now runs; a bad reference path or architecture fails before any work, naming
    algorithm.ref_hf_path."""
    from megatron_rl.config import ConfigError, load_config
    from megatron_rl.models.tiny import tiny_hf_config
    from megatron_rl.trainer import check_supported

    policy, other = tmp_path / "policy", tmp_path / "other"
    tiny_hf_config("llama").save_pretrained(str(policy))
    tiny_hf_config("qwen3").save_pretrained(str(other))
    base = [f"model.hf_path={policy}", "algorithm.kl_coef=0.1"]
    check_supported(load_config(overrides=base))  # the policy's own weights: fine
    check_supported(load_config(overrides=[*base, f"algorithm.ref_hf_path={policy}"]))
    check_supported(load_config(overrides=[f"model.hf_path={policy}", "train.shared_prefix=false"]))  # naive runs
    with pytest.raises(ConfigError, match=r"^config error: algorithm.ref_hf_path: .* another shape .*head_dim 64 != 32"):
        check_supported(load_config(overrides=[*base, f"algorithm.ref_hf_path={other}"]))
    with pytest.raises(ConfigError, match=r"^config error: algorithm.ref_hf_path: '.*missing' holds no config.json"):
        load_config(overrides=[*base, f"algorithm.ref_hf_path={tmp_path / 'missing'}"]).check_files()
    with pytest.raises(ConfigError, match=r"^config error: algorithm.kl_estimator: unknown estimator 'k4'"):
        load_config(overrides=[*base, "algorithm.kl_estimator=k4"])
