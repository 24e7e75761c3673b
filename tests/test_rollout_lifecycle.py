"""Unit tests of the rollout lifecycle state machine and tag handling (no vLLM, no processes)."""
import pytest

from megatron_rl.rollout.base import EngineStateError, MemoryReport, check_tags
from megatron_rl.rollout.lifecycle import Lifecycle

pytestmark = pytest.mark.unit

BOTH = ("kv_cache", "weights")


def test_tags_are_validated_and_normalised():
    assert check_tags(["weights", "kv_cache", "weights"]) == BOTH
    with pytest.raises(EngineStateError, match="unknown or empty tags"):
        check_tags(["kv"])
    with pytest.raises(EngineStateError, match="unknown or empty tags"):
        check_tags([])
    with pytest.raises(EngineStateError, match="got the string"):
        check_tags("weights")


def test_offload_round_trip_is_exact_again():
    lc = Lifecycle(weights_release="offload")
    lc.check_generate()
    lc.did_release(BOTH)
    assert (lc.state.kv_cache, lc.state.weights) == ("released", "offloaded")
    lc.did_resume(BOTH)
    lc.check_generate()
    assert lc.state.cycles == 1
    assert [e[0] for e in lc.state.events] == ["release", "resume"]


def test_discard_needs_a_complete_sync_before_generate():
    lc = Lifecycle(weights_release="discard")
    lc.did_release(("weights",))
    with pytest.raises(EngineStateError, match=r"weights are released \(discarded\).*resume\(\['weights'\]\)"):
        lc.check_generate()
    with pytest.raises(EngineStateError, match="cannot sync weights: they are released"):
        lc.check_sync()
    lc.did_resume(("weights",))
    with pytest.raises(EngineStateError, match="discarded and resumed without a weight sync"):
        lc.check_generate()
    assert lc.sync_needs_all()
    lc.did_begin_sync()
    with pytest.raises(EngineStateError, match="during a weight sync"):
        lc.check_generate()
    lc.did_end_sync(complete=False)
    with pytest.raises(EngineStateError, match="without a weight sync"):
        lc.check_generate()
    lc.did_begin_sync()
    lc.did_end_sync(complete=True)
    lc.check_generate()
    # The trainer's order: release -> (train) -> resume weights -> sync -> resume kv.
    assert [e[0] for e in lc.state.events] == ["release", "resume", "sync_begin", "sync_end",
                                                "sync_begin", "sync_end"]


def test_illegal_transitions_name_the_fix():
    lc = Lifecycle(weights_release="offload")
    with pytest.raises(EngineStateError, match="cannot resume kv_cache: it is not released"):
        lc.did_resume(("kv_cache",))
    lc.did_release(("kv_cache",))
    with pytest.raises(EngineStateError, match=r"KV cache is released; call resume\(\['kv_cache'\]\)"):
        lc.check_generate()
    with pytest.raises(EngineStateError, match="already released"):
        lc.did_release(("kv_cache",))
    with pytest.raises(EngineStateError, match="cannot resume weights: they are not released"):
        lc.check_resume(BOTH)
    lc.did_begin_sync()
    with pytest.raises(EngineStateError, match="called twice"):
        lc.did_begin_sync()
    with pytest.raises(EngineStateError, match="cannot release during a weight sync"):
        lc.check_release(("weights",))
    lc.did_end_sync(complete=True)
    with pytest.raises(EngineStateError, match="without begin_weight_update"):
        lc.did_end_sync(complete=True)


def test_dummy_start_waits_for_the_first_sync_and_never_offloads_garbage():
    lc = Lifecycle(weights_release="offload", dummy=True)
    with pytest.raises(EngineStateError, match="load_format='dummy'"):
        lc.check_generate()
    lc.did_release(("weights",))
    assert lc.state.weights == "discarded"  # nothing exact to keep
    with pytest.raises(EngineStateError, match="while the weights are released"):
        lc.set_mode("discard")
    lc.did_resume(("weights",))
    lc.did_begin_sync()
    lc.did_end_sync(complete=True)
    lc.check_generate()
    with pytest.raises(EngineStateError, match="offload or discard"):
        Lifecycle(weights_release="keep")


def test_memory_report_metrics_keys():
    m = MemoryReport(phase="released", kv_cache_bytes=1, weight_bytes=2, rss=3, device_used=4).as_metrics()
    assert m == {"rollout/mem/released/kv_cache_bytes": 1, "rollout/mem/released/weight_bytes": 2,
                 "rollout/mem/released/rss": 3, "rollout/mem/released/allocated": 0,
                 "rollout/mem/released/reserved": 0, "rollout/mem/released/device_used": 4}
