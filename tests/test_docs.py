"""Docs and command line true to the code: every Keys table lists exactly its config class's fields with
their defaults, one stage registry feeds the CLI and `posttrain run`, every recipe validates, and the
repository reads nothing outside itself."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import config as configs
from posttrain.cli import parser
from posttrain.config_io import load_config
from posttrain.errors import UserError
from posttrain.pipeline import load_recipe
from posttrain.stages import STAGES, TRAINING

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- keys: (\w+)")


def keys_tables() -> dict[str, dict[str, str]]:
    """``{class name: {key: default cell}}`` for every table marked ``<!-- keys: Class -->`` in docs/."""
    tables = {}
    for doc in sorted((ROOT / "docs").glob("*.md")):
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if m := MARKER.match(line):
                rows = {}
                for row in lines[i + 3:]:
                    if not row.startswith("|"):
                        break
                    key, default = [c.strip() for c in row.strip("|").split("|")][:2]
                    assert key.startswith("`") and key.endswith("`"), f"{doc.name}: {row}"
                    assert key.strip("`") not in rows, f"{doc.name}: {key} twice"
                    rows[key.strip("`")] = default
                assert m.group(1) not in tables, f"{m.group(1)} has two tables"
                tables[m.group(1)] = rows
    return tables


def documented_value(cell: str):
    if cell == "required":
        return ""
    value = yaml.safe_load(cell)
    if isinstance(value, str):
        try:
            return float(value)  # YAML reads 2e-5 as a string
        except ValueError:
            return value
    return value


def own_fields(cls) -> list[dataclasses.Field]:
    """The fields a config class declares (its own keys and the defaults it changes); all of TrainConfig's."""
    if cls is configs.TrainConfig:
        return list(dataclasses.fields(cls))
    return [f for f in dataclasses.fields(cls) if f.name in cls.__dict__.get("__annotations__", {})]


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def test_every_keys_table_lists_exactly_its_config_fields_with_their_defaults():
    tables = keys_tables()
    classes = [configs.TrainConfig] + [STAGES[name].config for name in TRAINING]
    assert set(tables) == {c.__name__ for c in classes}
    for cls in classes:
        rows = tables[cls.__name__]
        fields = own_fields(cls)
        assert list(rows) == [f.name for f in fields], cls.__name__  # the same keys, in declaration order
        for f in fields:
            assert documented_value(rows[f.name]) == default_of(f), f"{cls.__name__}.{f.name}: docs say {rows[f.name]}"


def test_the_keys_table_check_can_fail(tmp_path):
    """A wrong default or a missing key is caught (the comparison above is not vacuous)."""
    assert documented_value("2e-5") == 2e-5 and documented_value("null") is None and documented_value("[]") == []
    assert documented_value("0.0003") != default_of(next(f for f in dataclasses.fields(configs.TrainConfig)
                                                        if f.name == "learning_rate"))


def test_the_eval_tasks_table_lists_every_task():
    from posttrain.eval.tasks import TASKS

    text = (ROOT / "docs" / "eval.md").read_text()
    table = text[text.index("## Tasks"):text.index("`mc` runs on any file")]
    assert sorted(re.findall(r"^\| `(\w+)` \|", table, re.M)) == sorted(TASKS)


def test_one_stage_registry_feeds_the_cli_and_recipes(tmp_path):
    commands = parser()._subparsers._group_actions[0].choices
    assert TRAINING == ("midtrain", "sft", "dpo", "reward", "rlvr") and all(n in commands for n in TRAINING)
    assert "onpolicy_pairs" not in commands  # a recipe-only stage (eval and tts are commands of their own)
    for name, stage in STAGES.items():
        assert (ROOT / "docs" / f"{stage.docs}.md").is_file() and stage.help
        if stage.trains:
            assert commands[name].description.startswith(stage.help)
    with pytest.raises(UserError, match=f"one of {', '.join(STAGES)}"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text("output_dir: o\nstages:\n  - {name: x, stage: nope}\n")
        load_recipe(recipe)
    # a stage runs from key=value overrides alone (no --config): the config is built and validated
    from posttrain.cli import main

    code = main(["sft", "model=nope-model", f"output_dir={tmp_path / 'o'}", "datasets.0.path=x.jsonl"])
    assert code == 2  # a missing model is a user error, reached only after the config was accepted
    with pytest.raises(SystemExit):
        parser().parse_args(["sft", "--help"])


def test_a_stage_runs_without_a_config_file(tmp_path, tiny_model_dir):
    from conftest import addition_records, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", addition_records(8))
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "sft", f"model={tiny_model_dir}",
                           f"output_dir={tmp_path / 'out'}", f"datasets=[{{path: {data}}}]", "max_steps=2",
                           "per_device_train_batch_size=4", "max_seq_length=64", "save_steps=0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.json").is_file()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    """Pipeline recipes: every training stage's config builds with its class (a stage without a model
    starts from the previous one); stage configs (`<stage>-example.yaml`): with their stage's class."""
    data = yaml.safe_load(path.read_text())
    if "stages" in data:
        recipe = load_recipe(path)
        model = None
        for stage in recipe["stages"]:
            if stage["stage"] in TRAINING:
                cls = STAGES[stage["stage"]].config
                cfg = load_config(cls, base={"model": model, "output_dir": "o", **stage["config"]})
                model = cfg.model
    else:
        cls = STAGES[path.stem.split("-")[0]].config
        load_config(cls, path)


def test_the_package_recipe_validates():
    recipe = load_recipe(ROOT / "posttrain" / "recipes" / "demo.yaml")
    assert [s["stage"] for s in recipe["stages"] if s["stage"] in TRAINING]


def test_nothing_in_the_repository_reads_outside_it():
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    outside = "sha" + "red"  # the folder beside a checkout that users do not have (spelled in pieces: no hit here)
    needles = ["../" + outside, f'"{outside}" / "data"', f'"..", "..", "{outside}"']
    offenders = []
    for name in tracked:
        p = ROOT / name
        if p.suffix in (".py", ".md", ".yaml", ".toml", ".cfg", ".sh", "") and p.is_file() and not name.startswith("data/"):
            text = p.read_text(errors="ignore")
            if any(n in text for n in needles):
                offenders.append(name)
    assert offenders == []


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import statement of a file (``names`` empty for ``import x``)."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


# The import graph's layers (docs/architecture.md, "Layers"): a module imports only its own layer and
# those below. The command-line front ends of data/ and rag/ (``commands.py``) are the CLI's layer.
LAYERS = {"util": 0, "errors": 0, "templates": 0, "atomic": 0, "config": 0, "config_io": 0, "argtypes": 0,
          "__init__": 0,
          "models": 1, "logprobs": 1, "manifest": 1, "data": 1, "rewards": 1, "inference": 1,
          "rag": 2, "eval": 2, "envs": 2, "train": 3, "stages": 4, "pipeline": 4, "report": 4, "demo": 4, "demo_selfrag": 4, "demo_tools": 4,
          "commands": 5, "cli": 5}


def layer(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    if parts[-1] == "commands":
        return LAYERS["commands"]
    return LAYERS[parts[0]]


def test_no_module_imports_a_layer_above_it():
    package = ROOT / "posttrain"
    upward = []
    for path in package.rglob("*.py"):
        module = ".".join(("posttrain", *path.relative_to(package).with_suffix("").parts))
        for imported, _ in imports_of(path):
            if imported.startswith("posttrain.") and layer(imported) > layer(module):
                upward.append(f"{module} imports {imported}")
    assert upward == []
    assert layer("posttrain.data.decontam") < layer("posttrain.eval.tasks")  # the check can fail


def test_layers_and_names():
    import ast

    package = ROOT / "posttrain"
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules = set()  # names this file binds to posttrain modules or their members
        for module, names in imports_of(path):
            if module.startswith("posttrain") and module != "__future__":
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path}: imports private {private} from {module}"
                modules.update(names)
        reached = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                   and isinstance(n.value, ast.Name) and n.value.id in modules and n.attr.startswith("_")
                   and not n.attr.startswith("__")]
        assert not reached, f"{path}: reaches private names {reached}"
    for path in (ROOT / "tests").glob("*.py"):
        for module, names in imports_of(path):
            if module.startswith("posttrain"):
                assert not [n for n in names if n.startswith("_")], f"{path}: imports private names from {module}"
    # one public function per name (these three once meant different things in different modules)
    import ast

    defined: dict[str, list[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(str(path.relative_to(package)))
    for name in ("collate", "model_fingerprint", "resolve", "log"):
        assert len(defined.get(name, [])) <= 1, (name, defined.get(name))
    calls = [p for p in package.rglob("*.py") if ".backward(" in p.read_text()]
    assert [str(p.relative_to(package)) for p in calls] == ["train/loop.py"]  # one training loop
