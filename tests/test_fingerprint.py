"""Code fingerprints (vitok_core/fingerprint.py) and the key policy: what a stage's fingerprint covers, that it
follows the bytes of exactly those files and not the checkout's path, how a manifest's code compares with this
checkout's, and the settings that stay out of the keys (checkpoint cadence, evaluate.keep)."""

from __future__ import annotations

import shutil
from pathlib import Path

from vitok_core.artifacts import stage_key
from vitok_core.config import load_config
from vitok_core.fingerprint import ROOT, compare, fingerprint, manifest_fields, module_files

COPIED = ("jobs", "vitok_core")


def _copy_tree(target: Path) -> Path:
    for name in COPIED:
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_fingerprint_covers_the_transitive_project_imports_of_a_stage():
    train = fingerprint("train_ae")
    assert train == fingerprint("train_ae") and len(train["fingerprint"]) == 16  # deterministic
    files = set(train["files"])
    # the job, the shared job code, and vitok_core modules reached only through other modules
    assert {"jobs/train_ae.py", "jobs/train_common.py", "jobs/common.py", "jobs/__init__.py"} <= files
    assert {"vitok_core/losses.py", "vitok_core/__init__.py", "vitok_core/model/__init__.py"} <= files
    assert "vitok_core/model/layers.py" in files  # model/__init__ -> autoencoder -> layers
    assert "vitok_core/dino_weights.py" in files  # imported inside a function of losses.py
    assert "jobs/ingest.py" not in files  # another stage's job: imported only to plan its output location
    assert not any(f.startswith(("pipelines/", "tests/")) for f in files)
    assert set(train["hashes"]) == files and train["files"] == sorted(files)
    # a stage's name and its entry module are the same thing; train_flow's stage includes its sampler
    assert fingerprint("jobs.train_ae")["fingerprint"] == train["fingerprint"]
    assert "jobs/sample.py" in fingerprint("train_flow")["files"]
    assert "vitok_core/model/dit.py" not in files and "vitok_core/model/dit.py" in fingerprint("train_flow")["files"]


def test_fingerprint_follows_the_bytes_of_its_files_not_the_checkout(tmp_path):
    copy = _copy_tree(tmp_path / "elsewhere")
    before = {stage: fingerprint(stage, copy)["fingerprint"] for stage in ("ingest", "train_ae")}
    assert before["train_ae"] == fingerprint("train_ae")["fingerprint"]  # another path, the same code
    recorded = manifest_fields("train_ae", copy)  # what a manifest written by this code records
    assert recorded["code_fingerprint"] == before["train_ae"]
    assert compare("train_ae", recorded, root=copy)["state"] == "current"

    (copy / "vitok_core" / "demo.py").write_text("# imported by no stage\n", encoding="utf-8")
    (copy / "vitok_core" / "unused.py").write_text("x = 1\n", encoding="utf-8")
    assert {stage: fingerprint(stage, copy)["fingerprint"] for stage in before} == before

    losses = copy / "vitok_core" / "losses.py"
    losses.write_bytes(losses.read_bytes() + b"\n# a comment changes the fingerprint (never the key)\n")
    after = fingerprint("train_ae", copy)
    assert after["fingerprint"] != before["train_ae"]
    assert fingerprint("ingest", copy)["fingerprint"] == before["ingest"]  # ingest does not import losses.py

    found = compare("train_ae", recorded, root=copy)
    assert found["state"] == "stale" and found["changed"] == ["vitok_core/losses.py"]
    assert found["recorded"] == before["train_ae"] and found["current"] == after["fingerprint"]
    assert compare("train_ae", {"step": 3}, root=copy)["state"] == "unknown"  # written before fingerprints


def test_imports_found_by_ast(tmp_path):
    """Relative imports, `from package import submodule`, imports inside functions, and package __init__ files
    count; names imported from a module, modules outside the project and TYPE_CHECKING imports do not."""
    files = {
        "jobs/__init__.py": "",
        "jobs/toy.py": (
            "from typing import TYPE_CHECKING\nimport numpy\nfrom vitok_core import helper, VERSION\n"
            "from vitok_core.pkg import thing\nif TYPE_CHECKING:\n    from vitok_core import typed\n"
            "def later():\n    import vitok_core.lazy\n"
        ),
        "vitok_core/__init__.py": "VERSION = 1\n",
        "vitok_core/helper.py": "",
        "vitok_core/lazy.py": "",
        "vitok_core/typed.py": "",
        "vitok_core/unrelated.py": "",
        "vitok_core/pkg/__init__.py": "from .sub import thing\n",
        "vitok_core/pkg/sub.py": "from ..helper import *\nthing = 1\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    found = sorted(module_files(["jobs.toy"], tmp_path))
    assert found == ["jobs/__init__.py", "jobs/toy.py", "vitok_core/__init__.py", "vitok_core/helper.py",
                     "vitok_core/lazy.py", "vitok_core/pkg/__init__.py", "vitok_core/pkg/sub.py"]  # fmt: skip


def test_checkpoint_cadence_and_grid_size_are_not_in_the_keys():
    from jobs.evaluate import evaluate_settings
    from jobs.evaluate import output_uri as evaluate_uri
    from jobs.train_ae import CODE_VERSION, train_settings
    from jobs.train_flow import output_uri as flow_uri

    def ae_key(*overrides: str) -> str:  # as jobs.train_ae.output_uri computes it, without an ingest output
        return stage_key("train_ae", train_settings(load_config("tiny", overrides), "k"), ["k"], CODE_VERSION)

    assert ae_key() == ae_key("train.checkpoint_every=7") != ae_key("train.steps=300")
    assert ae_key("optim.lr=2e-3") != ae_key()  # a changed optimizer reruns train_ae and what follows it
    # injected NaNs restore the last checkpoint: there the cadence decides the weights, so it is in the key
    nan = "train.faults.nan_at_steps=[2,3,4]"
    assert ae_key(nan) != ae_key(nan, "train.checkpoint_every=7") and ae_key(nan) != ae_key()

    def flow(*overrides: str) -> str:
        return flow_uri(load_config("tiny", overrides), "cachekey")

    assert flow() == flow("flow.checkpoint_every=7") != flow("flow.steps=77")

    def evaluate(*overrides: str) -> str:
        return evaluate_uri(load_config("tiny", overrides), ["ae:abc"])

    assert evaluate() == evaluate("evaluate.keep=9") != evaluate("evaluate.max_images=5")
    assert "keep" not in evaluate_settings(load_config("tiny"))
