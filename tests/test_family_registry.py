"""The model-family registry (nexus_jax.families, issue 21): every family's entry points resolve, the CLIs, the
converter and the planner find families only through it, and the packages it ties together have no import cycles."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from configs.training import PRESETS
from nexus_jax import families
from nexus_jax.families import Component, Family, InferenceEntry, TrainingEntry
from nexus_jax.inference.job import Job, Session

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nexus_jax", "conversion", "launch", "configs")


# ----------------------------------------------------------------------------------------- registered families
def test_every_family_resolves_all_its_entry_points():
    assert families.names() == ["nexus_gen", "unipic"]
    for fam in families.families():
        refs = fam.entry_points()
        assert refs, fam.name
        for key, ref in refs.items():
            obj = families.resolve(ref)
            assert callable(obj), f"{fam.name}.{key} -> {ref} is not callable"
        for cname, comp in fam.components.items():
            assert dataclasses.is_dataclass(families.resolve(comp.config)), f"{fam.name}.{cname}.config"
            assert isinstance(families.resolve(comp.model), type), f"{fam.name}.{cname}.model"
        for name, ref in fam.conversion.items():
            assert families.resolve(ref)().name == name, f"{fam.name}: conversion factory {ref} builds another family"


def test_components_name_converter_families_whose_config_and_model_match():
    from flax import nnx

    from conversion.families import get_family

    for fam in families.families():
        for cname, comp in fam.components.items():
            conv = get_family(comp.conversion)
            cfg = conv.preset(min(n for n in conv.presets if n.startswith("tiny")))
            assert isinstance(cfg, families.resolve(comp.config)), f"{fam.name}.{cname}: {type(cfg).__name__}"
            model = nnx.eval_shape(lambda c=cfg, conv=conv: conv.build(c, nnx.Rngs(0)))
            assert isinstance(model, families.resolve(comp.model)), f"{fam.name}.{cname}: {type(model).__name__}"


def test_converter_family_names_are_unchanged_and_each_resolves():
    from conversion.families import family_names, get_family

    assert family_names() == sorted(["editing_decoder", "flux_dit", "generation_decoder", "kl16_vae", "nexus_ar",
                                     "qwen2_5_vl", "qwen2_text", "unipic", "vae"])
    for name in family_names():
        assert get_family(name).name == name
    from conversion.errors import ConversionError

    with pytest.raises(ConversionError, match="unknown model family 'nope'.*nexus_ar"):
        get_family("nope")


def test_every_train_preset_and_plan_workload_belongs_to_one_family():
    from configs.plans import PLANS
    from launch.workloads import BUILDERS
    from nexus_jax.training.cli import presets

    tasks = [t for f in families.families() if f.training for t in f.training.tasks]
    assert len(tasks) == len(set(tasks)), tasks
    assert presets() == PRESETS  # no family keeps presets of its own yet
    for name, preset in presets().items():
        assert preset.task in families.for_task(preset.task).training.tasks, name
    workloads = families.workload_names()
    assert len(workloads) == len(set(workloads)) and not set(workloads) & set(BUILDERS), workloads
    for name, plan in PLANS.items():
        assert plan.workload in BUILDERS or families.workload_builder(plan.workload) is not None, name
    with pytest.raises(ValueError, match="no registered family trains task 'nope'"):
        families.for_task("nope")


def test_checkpoint_dispatch(tmp_path):
    """A converted UniPic-1 directory (config.json family unipic) goes to UniPic; anything else to the default."""
    assert [f.name for f in families.families() if f.inference and f.inference.detect is None] == ["nexus_gen"]
    assert families.for_checkpoint(tmp_path).name == "nexus_gen"
    (tmp_path / "config.json").write_text(json.dumps({"family": "unipic"}))
    assert families.for_checkpoint(tmp_path).name == "unipic"


def test_bad_entry_points_are_named():
    with pytest.raises(ValueError, match="'nexus_jax.families' is not of the form"):
        families.resolve("nexus_jax.families")
    with pytest.raises(ImportError, match="nexus_jax.families:nope"):
        families.resolve("nexus_jax.families:nope")
    with pytest.raises(ValueError, match="unknown model family 'nope'; registered"):
        families.get("nope")


# --------------------------------------------------------------- a toy family reached only through the registry
class ToyJob(Job):
    """Answers every request with its prompt reversed (a stand-in for a family's compute)."""

    def __init__(self, out, progress):
        super().__init__(None, None, out, progress)

    def compute(self, batch):
        return [{"text": p.request.prompt[::-1]} for p in batch.items]


@dataclasses.dataclass(frozen=True)
class ToyPrepared:
    request: object
    length: int = 4

    @property
    def grid(self):
        import numpy as np

        return np.zeros((0, 3), np.int64)


def toy_detect(checkpoint) -> bool:
    return (Path(checkpoint) / "toy.marker").exists()


def toy_open(args, mesh=None):
    return Session("toy", ToyPrepared, ToyJob)


TOY_SETUP, TOY_TASK = object(), object()


def toy_setup(cfg, init_from=""):
    from nexus_jax.training.init_from import ModelSetup

    return ModelSetup(TOY_SETUP, {})


def toy_task(cfg, setup, tokenizer_dir=""):
    assert setup.model_cfg is TOY_SETUP
    return TOY_TASK


TOY_PRESETS = {"tiny_toy": dataclasses.replace(PRESETS["tiny_ar"], task="toy_task")}


def toy_conversion():
    from conversion.families import unipic_family

    return dataclasses.replace(unipic_family(), name="toy_conv")


def toy_workload(plan, remat):
    return ("toy workload", plan.name, remat)


TOY = Family(
    name="toy",
    description="a family only this test knows",
    components={"toy": Component("configs.unipic:UniPicConfig", "nexus_jax.models.unipic.model:UniPic", "toy_conv")},
    conversion={"toy_conv": f"{__name__}:toy_conversion"},
    inference=InferenceEntry(open=f"{__name__}:toy_open", detect=f"{__name__}:toy_detect"),
    training=TrainingEntry(tasks=("toy_task",), setup=f"{__name__}:toy_setup", task=f"{__name__}:toy_task",
                           presets=f"{__name__}:TOY_PRESETS"),
    workloads={"toy_workload": f"{__name__}:toy_workload"},
)


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(families.REGISTRY, "toy", f"{__name__}:TOY")
    return TOY


def test_toy_family_is_found_by_infer_train_convert_and_plan(toy_registered, tmp_path):
    from configs.plans import PLANS
    from conversion.families import family_names, get_family
    from launch.workloads import make_workload
    from nexus_jax.inference import cli as infer_cli
    from nexus_jax.training.cli import build_parser, config_from_args, make_task

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "toy.marker").write_text("")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "task": "understanding", "messages": [
        {"role": "user", "content": "hello toy"}]}) + "\n")
    out = tmp_path / "out"
    rc = infer_cli.main(["--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out),
                         "--batch-size", "1", "--num-threads", "0", "--no-progress"])
    assert rc == 0
    (rec,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert (rec["id"], rec["status"], rec["text"]) == ("a", "ok", "yot olleh")

    args = build_parser().parse_args(["--preset", "tiny_toy", "--data", str(requests), "--run-dir", str(out)])
    cfg = config_from_args(args)
    assert (cfg.task, cfg.data.path) == ("toy_task", str(requests))
    assert make_task(cfg) is TOY_TASK
    assert get_family("toy_conv").name == "toy_conv" and "toy_conv" in family_names()
    plan = PLANS["tiny_matmul"].replace(workload="toy_workload")
    assert make_workload(plan, "none") == ("toy workload", "tiny_matmul", "none")


# ------------------------------------------------------------------------------------------------- structure
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path], skip_functions: tuple[str, ...] = ()) -> set[str]:
    """The repository modules ``path`` imports anywhere (module level and inside functions: a lazy import still
    ties the two modules together), except inside functions named in ``skip_functions``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    tree = ast.parse(path.read_text())
    skipped = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in skip_functions
               for n in ast.walk(f)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(known(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.update(known(f"{base}.{a.name}") for a in node.names)
    return {m for m in found if m and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_through_the_family_registry():
    """No cycle, lazy imports included, touches the registry or what it ties together (inference, UniPic, training,
    the converter's families, the planner's workloads)."""
    modules = _modules()
    graph = {m: _imports(p, modules) & set(modules) for m, p in modules.items()}
    watched = ("nexus_jax.families", "nexus_jax.inference", "nexus_jax.unipic", "nexus_jax.training",
               "conversion.families", "launch.workloads")
    bad = [c for c in _cycles(graph) if any(m == w or m.startswith(w + ".") for m in c for w in watched)]
    assert not bad, f"import cycles: {bad}"


def test_clis_reach_families_only_through_the_registry():
    modules = _modules()
    family_code = ("nexus_jax.unipic", "nexus_jax.inference.nexus_gen", "nexus_jax.inference.loading",
                   "nexus_jax.inference.runner", "nexus_jax.training.ar_loop", "nexus_jax.training.decoder_loop",
                   "nexus_jax.training.unipic_loop", "nexus_jax.families.nexus_gen", "nexus_jax.families.unipic")
    for cli in ("nexus_jax/inference/cli.py", "nexus_jax/training/cli.py"):
        # inference/cli.__getattr__ only keeps the old import path of Nexus-Gen's InferenceJob working
        imported = _imports(ROOT / cli, modules, skip_functions=("__getattr__",))
        assert "nexus_jax.families" in imported, cli
        bad = sorted(m for m in imported if any(m == f or m.startswith(f + ".") for f in family_code))
        assert not bad, f"{cli} imports family code directly: {bad}"
    registry = _imports(ROOT / "nexus_jax/families/__init__.py", modules)
    assert not registry, f"the registry must import no repository module (entry points are strings): {registry}"
