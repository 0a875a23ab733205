"""The shape of the code: layering, import-graph height, imports at the top, and what the registries derive."""
import ast
import importlib
import io
import re
import subprocess
import sys
import tokenize

import numpy as np
import pytest

from tests.helpers import REPO
from tools import import_graph


def test_no_library_module_imports_a_stage_script_and_the_graph_is_at_most_six_tall():
    g = import_graph.graph()
    offenders = [(m, d) for m, ds in g.items() if m.startswith("utils") for d in ds if import_graph.is_script(d)]
    assert offenders == []
    height, chain = import_graph.height(g)
    assert height <= 6, " -> ".join(chain)


def test_import_graph_tool_exits_zero_and_prints_the_height():
    r = subprocess.run([sys.executable, "tools/import_graph.py"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"graph height [1-6]:", r.stdout), r.stdout


def test_config_choices_and_aliases_come_from_the_registries():
    from config.config import choices, parse_config
    from utils.cleaning import registry
    from utils.selection import registry as selection

    assert choices("coreset_method") == ("full", "relabel", *selection.METHODS, "eval_simprobs", "eval_simprobs_clean")
    assert choices("clean_rule") == tuple(registry.RULES)
    assert parse_config(["--coreset_method", "eval_simprobs"]).coreset_method == "diffprob"
    assert parse_config(["--coreset_method", "eval_simprobs_clean"]).coreset_method == "diffprob_clean"
    with pytest.raises(SystemExit) as e:
        parse_config(["--coreset_method", "nonsense"])
    assert e.value.code == 2


def test_readme_method_table_is_the_registrys():
    from utils.selection.registry import method_table

    assert method_table() in (REPO / "README.md").read_text(), "README's method table: paste utils.selection.registry.method_table()"


def test_a_new_method_is_one_registry_entry(tmp_path, monkeypatch):
    """Registering a method makes it a config choice, a pipeline method and an output folder at once."""
    from config import config as config_module
    from utils.artifacts import paths
    from utils.selection import registry as selection

    monkeypatch.setattr(selection, "METHODS", dict(selection.METHODS))

    @selection.register_method("lowest_index", title="lowest index", summary="per identity, the first images")
    def select_lowest(rec, cfg):
        from utils import pruning

        kept = pruning.keep_top_per_identity(-np.arange(len(rec.labels), dtype=float), rec.labels, cfg.fraction,
                                             cfg.min_samples_per_id)
        return selection.Selection(kept)

    cfg = config_module.parse_config(["--coreset_method", "lowest_index", "--output", str(tmp_path)])
    assert cfg.coreset_method == "lowest_index"
    assert paths.coreset_dir(cfg) == tmp_path / "coresets" / "iresnet50_CosFace" / "lowest_index_0.50"
    assert "lowest_index" in selection.method_table()
    labels = np.repeat(np.arange(3), 10)
    rec = selection.Records(cfg, labels, None, 3)
    kept = selection.run_selection(selection.get_method("lowest_index"), rec, cfg).kept
    assert kept.tolist() == [i for c in range(3) for i in range(10 * c, 10 * c + 5)]


@pytest.mark.parametrize("script", ["train_everything", "eval_trainset", "clean_trainset", "eval_simprobs",
                                    "coreset_dynunc", "coreset_rand", "coreset_entropy", "coreset_select",
                                    "generate_label_dict", "label_mapping", "eval_verification", "eval_ijbc",
                                    "run_pipeline"])
def test_stage_scripts_import_without_running(script):
    module = importlib.import_module(script)
    assert module.__doc__ and len(module.__doc__.strip().splitlines()) >= 3


def test_importing_a_registry_changes_no_config_and_config_names_no_method_or_rule():
    """The registries are asked (config.choices, config.aliases); importing one writes into nothing."""
    code = ("import config.config as c, copy; before = copy.deepcopy(c.CHOICES); "
            "import utils.selection.registry, utils.cleaning.registry; assert c.CHOICES == before; "
            "assert 'coreset_method' not in c.CHOICES and 'clean_rule' not in c.CHOICES; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    from utils.cleaning import registry as cleaning
    from utils.selection import registry

    source = (REPO / "config" / "config.py").read_text()
    logic = "\n".join(line.split("#")[0] for line in source.splitlines())  # the defaults too: the registries own them
    named = [n for n in (*registry.METHODS, *cleaning.RULES) if re.search(rf"[\"']{n}[\"']", logic)]
    assert named == [], f"config/config.py names {named}: a registry entry should declare it"
    from config.config import Config
    defaults = Config()
    assert defaults.coreset_method == registry.default_coreset_method() and defaults.clean_rule == cleaning.default_rule()


@pytest.mark.parametrize("method", ["el2n", "ccs_el2n", "ccs_aum", "ccs_dynunc", "dynunc", "rand", "entropy"])
def test_every_method_is_checked_by_the_keys_it_declares(method):
    """The per-identity minimum check and the window check were typed by method name, and stale: EL2N and the
    ccs_* methods skipped the minimum, ccs_dynunc the window. Now each entry's declared keys decide."""
    from config.config import ConfigError, check_against_dataset
    from utils.selection import registry

    reads = registry.METHODS[method].reads
    cfg = parse_args_for(method, ["--min_samples_per_id", "10", "--fraction", "0.25"])
    with pytest.raises(ConfigError, match="min_samples_per_id=10 alone keeps 120 of 200 images"):
        check_against_dataset(cfg, 200, 16, class_counts=[20, 5] * 8)
    cfg = parse_args_for(method, ["--window", "12", "--num_epoch", "8", "--lr_steps", "4"])
    if "window" in reads:
        with pytest.raises(ConfigError, match=r"window=12 needs num_epoch >= window \+ 1 = 13 \(found 8\)"):
            check_against_dataset(cfg, 200, 16)
    else:
        check_against_dataset(cfg, 200, 16)
    cfg = parse_args_for(method, ["--record_topk", "0"])
    if "topk" in registry.METHODS[method].needs:
        with pytest.raises(ConfigError, match=f"coreset_method={method} reads the top-k logits"):
            check_against_dataset(cfg, 200, 16)
    else:
        check_against_dataset(cfg, 200, 16)


def parse_args_for(method, extra):
    from config.config import parse_config

    return parse_config(["--coreset_method", method, "--dataset", "synthetic", "--batch_size", "32", *extra])


def test_no_private_helper_is_imported_across_modules():
    """A helper two modules use is public where it lives (scores.py imported nine of pruning.py's private ones)."""
    offenders = []
    for path in [*REPO.glob("*.py"), *(REPO / "utils").rglob("*.py"), *(REPO / "tools").glob("*.py"),
                 *(REPO / "config").glob("*.py"), *(REPO / "backbones").glob("*.py"), *(REPO / "losses").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    node.module.split(".")[0] in ("utils", "config", "backbones", "losses", "tools"):
                offenders += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_every_import_inside_a_function_under_utils_says_why():
    """Imports sit at the top of a module, where a reader looks for what it depends on. One inside a function (a heavy
    or optional dependency only that path needs, an import a forking parent makes for its children) says why in a
    comment on its line or the line above; a run of such imports shares the comment above its first line."""
    offenders = []
    for path in sorted((REPO / "utils").rglob("*.py")):
        source = path.read_text()
        commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                     if tok.type == tokenize.COMMENT}
        tree = ast.parse(source)
        import_lines = {n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
        inside = {n.lineno for scope in ast.walk(tree) if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(scope) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for line in sorted(inside):
            first = line
            while first - 1 in import_lines:
                first -= 1
            if not {line, first - 1} & commented:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {source.splitlines()[line - 1].strip()}")
    assert offenders == [], "move these imports to the top of their module, or say why they are here:\n" + \
        "\n".join(offenders)
