"""Unit tests of the CPU memory primitives behind the KV-cache release (no vLLM, no processes).

The KV release gives a storage's physical pages back with madvise(MADV_DONTNEED) and keeps
the tensor: RSS must fall by (almost) the storage's bytes, the tensor must stay usable and read
zero, and writing it again must bring the pages back.
"""
import pytest
import torch

from megatron_rl.rollout import cpu_memory

pytestmark = pytest.mark.unit

MIB = 1 << 20


def test_discard_pages_returns_rss_and_keeps_the_tensor_usable():
    t = torch.empty(64 * MIB, dtype=torch.uint8)
    t.fill_(7)  # every page resident
    ptr = t.data_ptr()
    before = cpu_memory.rss_bytes()
    advised = cpu_memory.discard_pages(t.untyped_storage())
    after = cpu_memory.rss_bytes()
    assert 64 * MIB - 2 * cpu_memory._PAGE <= advised <= 64 * MIB
    assert before - after >= 0.97 * advised, f"RSS fell {before - after} of {advised} advised bytes"
    assert t.data_ptr() == ptr
    inner = t[cpu_memory._PAGE:-cpu_memory._PAGE]  # whole pages only are advised; edges may keep 7s
    assert int(inner.max()) == 0, "discarded pages must read as zero"
    t.fill_(3)  # touching brings the pages back
    assert cpu_memory.rss_bytes() - after >= 0.97 * advised
    assert int(t.min()) == 3 and int(t.max()) == 3


def test_discard_range_never_touches_bytes_outside_it():
    page = cpu_memory._PAGE
    base = torch.full((6 * page,), 5, dtype=torch.uint8)
    lo = base.data_ptr() + 100  # unaligned start and end, inside the tensor
    n = 3 * page + 50
    advised = cpu_memory.discard_range(lo, n)
    got = base.numpy()
    zero = got == 0
    assert advised in (2 * page, 3 * page) and int(zero.sum()) == advised, (advised, int(zero.sum()))
    first = int(zero.argmax())
    assert (base.data_ptr() + first) % page == 0 and base.data_ptr() + first >= lo
    assert base.data_ptr() + first + advised <= lo + n
    assert (got[~zero] == 5).all()
    # a range smaller than a page holds no whole page: nothing changes
    small = torch.full((page // 2,), 9, dtype=torch.uint8)
    assert cpu_memory.discard_pages(small.untyped_storage()) == 0
    assert int(small.min()) == 9


def test_return_memory_to_os_reports_the_trim():
    done = cpu_memory.return_memory_to_os()
    assert done.get("malloc_trim") in (0, 1)
