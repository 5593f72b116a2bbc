"""The ``lolrl`` command: every stage listed and reachable, each root script a shim of its stage."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hh_tiny import pro_row

from lolrl import cli

ROOT = Path(__file__).resolve().parents[2]


def _stages(node=cli.STAGES, words=()):
    for name, entry in node.items():
        if isinstance(entry, dict):
            yield from _stages(entry, (*words, name))
        else:
            yield (*words, name), entry


STAGES = list(_stages())


def test_every_root_script_is_a_stage():
    scripts = {p.name for p in ROOT.glob("*.py") if p.name not in ("setup.py",)}
    assert {entry[1] for _, entry in STAGES} == scripts


def test_help_lists_every_stage(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for words, (_, script, _) in STAGES:
        assert " ".join(words) in text and script in text


@pytest.mark.parametrize("words, entry", STAGES, ids=[" ".join(w) for w, _ in STAGES])
def test_each_stage_takes_help_and_a_config(words, entry, capsys, monkeypatch):
    """``lolrl STAGE --help`` prints the stage's own flags under its command's name, --config among them."""
    monkeypatch.setattr(sys, "argv", ["lolrl"])
    with pytest.raises(SystemExit) as stop:
        cli.main([*words, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"usage: lolrl {' '.join(words)} ") and "--config" in out


@pytest.mark.parametrize("words, entry", STAGES, ids=[" ".join(w) for w, _ in STAGES])
def test_each_root_script_is_a_shim_of_its_stage(words, entry):
    """At most 15 lines, no definitions: it imports the stage's function and calls it."""
    path = ROOT / entry[1]
    text = path.read_text()
    assert len(text.splitlines()) <= 15, path.name
    tree = ast.parse(text)
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))], path.name
    module, function = entry[0].split(":")
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert (module, function) in imported, (path.name, imported)


def test_unknown_stage_is_one_line_and_status_2(capsys):
    assert cli.main(["hh", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lolrl hh: unknown stage 'nope'") and len(err.splitlines()) == 1


def _run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "lolrl", *argv], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_lolrl_clean_hh_runs_the_stage(tmp_path):
    rows = [pro_row(("fine", "cut off:")), pro_row(("ok", "good"))]
    source = tmp_path / "train.json"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _run("clean-hh", "--input", str(source), "--output", str(tmp_path / "clean.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = [json.loads(line) for line in (tmp_path / "clean.json").read_text().splitlines()]
    assert [r["suffix"] for r in kept] == [["ok", "good"]]


@pytest.mark.slow
def test_lolrl_train_runs_the_generic_script(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    """``lolrl train`` is the original generic script: the same flags, a trained model and results."""
    out = tmp_path / "out"
    proc = _run("train", "-i", str(toy_dir), "-tn", "toy", "--reward", toy_reward_spec, "-m", tiny_models["causal"],
                "-o", str(out), "-algo", "nll", "-t", "-e", "1", "--max_steps", "1", "-bs", "8", "-v_bs", "16",
                "-ml", "6", "--num_beams", "1", "--no_test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "config.json").exists() and (out / "eval_results.json").exists()
