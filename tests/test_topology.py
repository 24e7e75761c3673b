"""The topology is the one source of rank facts (issue 12, Build item 1).

(a) megatron's ``parallel_state`` is read in at most 2 modules of ``megatron_rl/`` (AST scan,
    with a planted module as negative control); (b) the rollout rank formula lives only in
    ``parallel/grid.py`` (AST scan + planted control); (c) :class:`Topology`'s coordinates match
    an enumeration written here independently, for several layouts. No processes.
"""
from __future__ import annotations

import ast
import itertools
import pathlib
import re

import pytest

from megatron_rl.parallel.grid import LayoutError, RankGrid, TrainCoord
from megatron_rl.parallel.topology import RolloutGrid, Topology

pytestmark = pytest.mark.unit

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "megatron_rl"

MAX_READERS = 2
FORMULA_HOME = "parallel/grid.py"


def _modules(root: pathlib.Path) -> dict[str, ast.AST]:
    return {path.relative_to(root).as_posix(): ast.parse(path.read_text(), filename=str(path))
            for path in sorted(root.rglob("*.py"))}


# -- (a) parallel_state readers -----------------------------------------------------------------

_PS_NAMES = {"parallel_state", "mpu"}  # megatron.core.mpu is an alias of parallel_state


def reads_parallel_state(tree: ast.AST) -> bool:
    """Imports megatron's parallel_state (any spelling), reaches it as an attribute, or names it to importlib."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name.startswith("megatron.core.") and a.name.split(".")[2] in _PS_NAMES for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron"):
            parts = (node.module or "").split(".")
            if set(parts) & _PS_NAMES or any(a.name in _PS_NAMES for a in node.names):
                return True
        elif isinstance(node, ast.Attribute) and node.attr in _PS_NAMES:
            return True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"megatron\.core\.(parallel_state|mpu)", node.value):
            return True
    return False


def _readers(root: pathlib.Path) -> list[str]:
    return [rel for rel, tree in _modules(root).items() if reads_parallel_state(tree)]


def test_parallel_state_is_read_in_at_most_two_modules():
    readers = _readers(PACKAGE)
    assert "parallel/__init__.py" in readers, readers  # the scan sees the one module that must read it
    assert len(readers) <= MAX_READERS, f"megatron's parallel_state is read in {readers}; pass the Topology instead"


@pytest.mark.parametrize("source", [
    "from megatron.core import parallel_state as ps\nps.get_data_parallel_rank()\n",
    "from megatron.core import mpu\n",
    "import megatron.core.parallel_state\n",
    "from megatron.core.parallel_state import get_tensor_model_parallel_rank\n",
    "import megatron.core as mc\nmc.parallel_state.is_pipeline_last_stage()\n",
    "import importlib\nps = importlib.import_module('megatron.core.parallel_state')\n",
    "def f():\n    from megatron.core import parallel_state\n    return parallel_state\n",
])
def test_parallel_state_scan_counts_a_planted_reader(tmp_path, source):
    (tmp_path / "clean.py").write_text("import torch\nfrom megatron.core.models.gpt import GPTModel\nx = 'parallel'\n")
    (tmp_path / "planted.py").write_text(source)
    assert _readers(tmp_path) == ["planted.py"]


# -- (b) the rollout rank formula ---------------------------------------------------------------

_GLOBAL_RANK = re.compile(r"(self\.)?(rank|global_rank)|(dist|torch\.distributed)\.get_rank\(\)")
_TP = re.compile(r"\b(rollout_)?tp\b")  # a tp degree (tp, cfg.tp, rollout_tp), not tp_rank


def formula_sites(tree: ast.AST) -> list[str]:
    """Where a module computes rollout coordinates itself: ``rank // tp``, ``rank % tp`` (global
    rank by a tp degree), ``replica * tp (+ ...)``, ``range(r * tp, ...)`` or ``range(0, world, tp)``."""
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Mod)):
            if _GLOBAL_RANK.fullmatch(ast.unparse(node.left)) and _TP.search(ast.unparse(node.right)):
                sites.append(ast.unparse(node))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            a, b = ast.unparse(node.left), ast.unparse(node.right)
            if any("replica" in x and _TP.search(y) for x, y in ((a, b), (b, a))):
                sites.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "range" and node.args:
            muls = [a for a in node.args if isinstance(a, ast.BinOp) and isinstance(a.op, ast.Mult)
                    and _TP.search(ast.unparse(a))]
            step = node.args[2] if len(node.args) == 3 else None
            if muls and len(node.args) == 2 or (step is not None and _TP.search(ast.unparse(step))):
                sites.append(ast.unparse(node))
    return sites


def test_rollout_rank_formula_lives_only_in_the_grid():
    found = {rel: s for rel, tree in _modules(PACKAGE).items() if (s := formula_sites(tree))}
    assert FORMULA_HOME in found, found  # the scan recognises the formula where it must be
    assert list(found) == [FORMULA_HOME], f"rollout rank formulas outside {FORMULA_HOME}: {found}"


@pytest.mark.parametrize("source", [
    "replica, tp_rank = rank // cfg.tp, rank % cfg.tp\n",
    "self.replica = self.rank // self.cfg.tp\n",
    "r = dist.get_rank() % rollout_tp\n",
    "rank = replica * tp + tp_rank\n",
    "ranks = [list(range(r * tp, (r + 1) * tp)) for r in range(world // tp)]\n",
    "leaders = [per_rank[r] for r in range(0, world, cfg.tp)]\n",
])
def test_formula_scan_flags_a_planted_formula(source):
    assert formula_sites(ast.parse(source))


def test_formula_scan_passes_layout_algebra():
    """Negative control: tp-local arithmetic of the layout code is not the rollout rank formula."""
    src = "kv = tp_rank // (tp // kv_heads)\nq = range(tp_rank * n, (tp_rank + 1) * n)\nd = world // (tp * pp)\n"
    assert formula_sites(ast.parse(src)) == []


# -- (c) the topology's coordinates vs an independent enumeration --------------------------------

LAYOUTS = [  # (world, tp, pp, cp, rollout_tp)
    (1, 1, 1, 1, 1), (4, 2, 2, 1, 2), (4, 1, 1, 1, 4), (8, 2, 2, 2, 4), (8, 1, 4, 1, 2),
    (8, 4, 1, 2, 1), (12, 2, 3, 1, 6), (16, 2, 2, 2, 8), (6, 1, 3, 2, 3),
]


def _train_enumeration(world, tp, pp, cp):
    """{rank: TrainCoord}: megatron's tp-cp-ep-dp-pp order, ranks handed out with tp fastest."""
    dp = world // (tp * pp * cp)
    ranks = itertools.count()
    return {next(ranks): TrainCoord(tp=t, cp=c, dp=d, pp=p)
            for p, d, c, t in itertools.product(range(pp), range(dp), range(cp), range(tp))}


def _rollout_enumeration(world, rollout_tp):
    """Consecutive blocks of rollout_tp ranks, one per replica."""
    ranks = list(range(world))
    return [tuple(ranks[i:i + rollout_tp]) for i in range(0, world, rollout_tp)]


@pytest.mark.parametrize("world,tp,pp,cp,rollout_tp", LAYOUTS)
def test_topology_coordinates_match_an_enumeration(world, tp, pp, cp, rollout_tp):
    grid = RankGrid(world_size=world, tp=tp, pp=pp, cp=cp)
    coords = _train_enumeration(world, tp, pp, cp)
    blocks = _rollout_enumeration(world, rollout_tp)
    for rank in range(world):
        topo = Topology.pure(grid, rank=rank, rollout_tp=rollout_tp)
        c = coords[rank]
        assert topo.coord == c
        pipeline = sorted(r for r, o in coords.items() if (o.tp, o.cp, o.dp) == (c.tp, c.cp, c.dp))
        assert topo.pp_ranks == pipeline and topo.pp_last_rank == pipeline[-1]
        assert (topo.is_first_stage, topo.is_last_stage) == (rank == pipeline[0], rank == pipeline[-1])
        assert topo.world_size == world
        replica = next(i for i, b in enumerate(blocks) if rank in b)
        r = topo.rollout
        assert (r.tp, r.replicas, r.replica, r.tp_rank) == (rollout_tp, len(blocks), replica,
                                                             blocks[replica].index(rank))
        assert r.replica_ranks == tuple(blocks)
        assert r.leaders == [b[0] for b in blocks]


def test_rollout_grid_rejects_a_rollout_tp_that_does_not_divide_the_world():
    with pytest.raises(LayoutError, match=r"rollout\.tp=3 does not divide (the )?world size 8; fix:"):
        RolloutGrid.of(RankGrid(world_size=8), rank=0, rollout_tp=3)


def test_pure_topology_has_no_groups():
    topo = Topology.pure(RankGrid(world_size=4, tp=2), rank=1, rollout_tp=2)
    assert topo.control_group is None and topo.pg_collection is None and topo.dp_cp_group is None


def test_shard_of_a_topology_and_of_a_wrapped_model():
    """The weight shard a loader fills: from the topology (tp fastest, pp slowest, written out
    here for TP2 x DP2 x PP2) and from a wrapped model's own groups (DDP -> GPTModel)."""
    from types import SimpleNamespace

    from megatron_rl.parallel.topology import ShardCoord, model_shard

    grid = RankGrid(world_size=8, tp=2, pp=2)
    expect = {r: ShardCoord(tp=2, tp_rank=r % 2, pp=2, pp_rank=r // 4) for r in range(8)}
    assert {r: Topology.pure(grid, rank=r).shard for r in range(8)} == expect

    class Group:
        def __init__(self, size, rank):
            self.size, self.rank = (lambda: size), (lambda: rank)

    gpt = SimpleNamespace(pg_collection=SimpleNamespace(tp=Group(4, 3), pp=Group(2, 1)))
    assert model_shard(SimpleNamespace(module=SimpleNamespace(module=gpt))) == ShardCoord(4, 3, 2, 1)
