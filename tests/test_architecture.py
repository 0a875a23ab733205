"""The shape of the code: layering, import-graph height, and what the registries derive."""
import importlib
import re
import subprocess
import sys

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
    from config.config import CHOICES, parse_config
    from utils.cleaning import rules as cleaning
    from utils.selection import registry as selection

    assert CHOICES["coreset_method"] == ("full", "relabel", *selection.METHODS, "eval_simprobs", "eval_simprobs_clean")
    assert CHOICES["clean_rule"] == tuple(cleaning.RULES)
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
    monkeypatch.setitem(config_module.CHOICES, "coreset_method", config_module.CHOICES["coreset_method"])

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
