"""Third-party method plugins through the `latentkit.methods` entry-point group, end to end through the CLI.

The plugin is the `sft-probe` example of docs/plugins.md, whose files are taken from that page (so the
documented example is proven to install, list and train). It is installed with a real
`pip install --no-deps --no-build-isolation --no-index --target <dir>`, which builds it through setuptools
and writes a real `.dist-info/entry_points.txt`, and the CLI subprocesses see it through PYTHONPATH.
Why `--target` rather than installing into the venv and uninstalling in a finalizer: the venv is shared by
other test runs (and other people) at the same time; a plugin installed there, above all one that clashes
with `sft`, would briefly be visible to them and fail their tests. Entry points are discovered on sys.path
exactly as in site-packages, so nothing the test checks depends on the install location. The target dirs
live under pytest's tmp dir and are removed with it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "plugins.md"
FAST_RUN = [
    "train.steps=1",
    "train.progress=false",
    "data.synth.n_train=8",
    "data.synth.n_val=0",
    "data.synth.n_test=0",
]

DUPLICATE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "latentkit-dup-sft"
version = "0.1.0"

[tool.setuptools]
packages = ["dup_sft"]

[project.entry-points."latentkit.methods"]
sft = "dup_sft.method:DupSFT"
"""

DUPLICATE_METHOD = """\
from latentkit.methods.sft.method import SFT


class DupSFT(SFT):
    pass
"""


def doc_files() -> dict[str, str]:
    """`<!-- file: PATH -->` followed by a fenced block in docs/plugins.md -> {PATH: contents}."""
    found = re.findall(
        r"<!-- file: (\S+) -->\n```\w*\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE
    )
    return dict(found)


def pip_install_target(files: dict[str, str], source: Path, target: Path) -> Path:
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text, encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "--quiet",
        "--target",
        str(target),
        str(source),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"pip install of {source.name} failed:\n{result.stdout}\n{result.stderr}"
    return target


def cli(site: Path, cwd: Path, *args: str) -> subprocess.Popen:
    """Start the installed `latentkit` console script with `site` on its path."""
    script = Path(sys.executable).with_name("latentkit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "latentkit"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [*command, *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def probe_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe-plugin")
    files = doc_files()
    assert {"pyproject.toml", "sft_probe/method.py"} <= set(files), (
        f"docs/plugins.md example files: {sorted(files)}"
    )
    return pip_install_target(files, root / "src", root / "site")


@pytest.fixture(scope="module")
def duplicate_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dup-plugin")
    files = {
        "pyproject.toml": DUPLICATE_PYPROJECT,
        "dup_sft/__init__.py": "",
        "dup_sft/method.py": DUPLICATE_METHOD,
    }
    return pip_install_target(files, root / "src", root / "site")


def test_doc_example_is_complete():
    files = doc_files()
    assert 'sft-probe = "sft_probe.method:SFTProbe"' in files["pyproject.toml"]
    assert "self.modules[" in files["sft_probe/method.py"]


@pytest.mark.slow
def test_plugin_lists_and_trains(probe_site: Path, tmp_path: Path):
    # Both commands at once: each spends most of its time importing torch/transformers.
    listing = cli(probe_site, tmp_path, "methods", "list", "--json")
    training = cli(
        probe_site,
        tmp_path,
        "train",
        "--method",
        "sft-probe",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=probe",
        *FAST_RUN,
    )
    code, out, err = finish(listing)
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["sft-probe"] == {
        "name": "sft-probe",
        "stages": ["sft"],
        "source": "plugin sft_probe.method:SFTProbe",
        "error": None,
    }
    assert rows["sft"]["source"] == "latentkit.methods.sft.method:SFT"

    code, out, err = finish(training)
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "probe"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert last["stage"] == "sft" and last["step"] == 1
    assert math.isfinite(last["loss"]) and math.isfinite(last["probe_bce"]) and last["probe_bce"] > 0
    assert math.isfinite(last["reference_kl"]) and last["reference_kl"] >= 0
    assert json.loads((run / "final" / "latentkit_method.json").read_text())["method"] == "sft-probe"
    from safetensors.torch import load_file

    owned = load_file(str(run / "final" / "method_modules.safetensors"))
    # trainable modules are saved; the frozen reference head is not
    assert (
        set(owned) == {"probe.weight", "probe.bias", "soft_prompt.weight"}
        and owned["probe.weight"].shape[0] == 1
    )
    assert not any("reference" in key for key in load_file(str(run / "final" / "model.safetensors")))
    # generation reads the learned soft prompt through the prompt-embeddings hook, right after the image
    shown = cli(
        probe_site,
        tmp_path,
        "generate",
        "--run",
        str(run),
        "--prompt",
        "What colour?",
        "--json",
        "--max-new-tokens",
        "2",
    )
    code, out, err = finish(shown)
    assert code == 0, err[-3000:]
    (trajectory,) = json.loads(out)["trajectories"]
    assert trajectory["prompt_vectors"] == [[trajectory["prompt_vectors"][0][0], 2]]


@pytest.mark.slow
def test_plugin_named_like_a_builtin_is_an_error(duplicate_site: Path, tmp_path: Path):
    runs = [
        cli(duplicate_site, tmp_path, "methods", "list"),
        cli(
            duplicate_site,
            tmp_path,
            "train",
            "--method",
            "sft",
            f"run.output_dir={tmp_path / 'runs'}",
            *FAST_RUN,
        ),
    ]
    for process in runs:
        code, out, err = finish(process)
        assert code == 2, (process.args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("error: method name 'sft' is registered twice")
        assert "latentkit.methods.sft.method:SFT" in lines[0] and "plugin dup_sft.method:DupSFT" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_unknown_method_lists_valid_ones(probe_site: Path, tmp_path: Path):
    code, out, err = finish(cli(probe_site, tmp_path, "train", "--method", "no-such-method", *FAST_RUN))
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "unknown method 'no-such-method'" in lines[0]
    valid = lines[0].split("valid methods:")[1]
    assert "sft" in valid and "sft-probe" in valid


def test_one_class_cannot_take_two_names():
    from latentkit.errors import RegistryError
    from latentkit.registry import _add, get_method

    sft = get_method("sft")
    with pytest.raises(RegistryError, match="already registered as 'sft'"):
        _add("sft2", sft, "plugin latentkit.methods.sft.method:SFT")
    assert sft.name == "sft"


# --- in-process: entry points from a distribution written by hand onto sys.path ----------------------------


def fake_distribution(site: Path, name: str, methods: dict[str, str]) -> Path:
    """A minimal installed distribution: METADATA and entry_points.txt, as pip writes them."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{method} = {value}\n" for method, value in methods.items())
    (info / "entry_points.txt").write_text(f"[latentkit.methods]\n{lines}")
    return site


def test_builtins_are_the_entry_points_of_latentkit_and_cover_every_method_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][
        "latentkit.methods"
    ]
    folders = {p.parent.name for p in (REPO / "methods").glob("*/__init__.py")}
    # a folder may hold a method's variants too (sft and sft-curriculum live in methods/sft/)
    declared_folders = {value.split(":")[0].split(".")[2] for value in declared.values()}
    assert declared_folders == folders, (
        "every folder under methods/ is declared as a latentkit.methods entry point"
    )
    from latentkit.registry import get_method, list_methods

    for name, value in declared.items():
        assert value.startswith("latentkit.methods.")
        assert get_method(name).name == name
    listed = {info.name: info for info in list_methods()}
    assert listed["sft"].stages == ("sft",) and listed["sft"].source == declared["sft"]
    assert listed["monet"].stages == ("warmup", "distill", "latent", "vlpo") and listed["monet"].error is None


def test_broken_plugins_are_listed_with_their_error_and_do_not_hide_the_others(monkeypatch, tmp_path, capsys):
    site = fake_distribution(
        tmp_path,
        "latentkit-broken",
        {"broken": "no_such_module_for_latentkit:Thing", "not-a-method": "json:JSONDecoder"},
    )
    monkeypatch.syspath_prepend(str(site))
    from latentkit.cli.app import main

    from latentkit.errors import RegistryError
    from latentkit.registry import get_method, list_methods

    infos = {info.name: info for info in list_methods()}
    assert {"sft", "monet", "broken", "not-a-method"} <= set(infos)
    assert infos["sft"].error is None
    assert (
        infos["broken"].stages == () and infos["broken"].source == "plugin no_such_module_for_latentkit:Thing"
    )
    assert (
        "failed to import" in infos["broken"].error
        and "no_such_module_for_latentkit" in infos["broken"].error
    )
    assert "not a latentkit.registry.Method subclass" in infos["not-a-method"].error
    with pytest.raises(RegistryError, match="'broken' .* failed to import"):
        get_method("broken")

    with pytest.raises(SystemExit) as exit_info:
        main(["methods", "list"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0 and not err
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "warmup -> distill -> latent -> vlpo" in lines["monet"]
    assert "error: method 'broken'" in lines["broken"] and "failed to import" in lines["broken"]
    with pytest.raises(SystemExit):
        main(["methods", "list", "--json"])
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["sft"]["error"] is None and "failed to import" in rows["broken"]["error"]

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "broken", f"run.output_dir={tmp_path / 'runs'}"])
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(
        "error: method 'broken' (plugin no_such_module_for_latentkit:Thing) failed to import"
    )


def test_a_plugin_named_like_a_builtin_is_refused_in_process(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(
        str(fake_distribution(tmp_path, "latentkit-clash", {"sft": "json:JSONDecoder"}))
    )
    from latentkit.errors import RegistryError
    from latentkit.registry import get_method, list_methods

    expected = "'sft' is registered twice: by latentkit.methods.sft.method:SFT and by plugin json:JSONDecoder"
    for call in (lambda: get_method("monet"), list_methods):
        with pytest.raises(RegistryError, match=re.escape(expected)):
            call()


def test_missing_builtin_entry_points_say_to_reinstall(monkeypatch):
    from latentkit import registry
    from latentkit.errors import RegistryError

    # No distribution declares the built-ins, as with metadata installed before they were entry points.
    monkeypatch.setattr(registry, "distributions", list)
    with pytest.raises(RegistryError, match=r"no built-in method is installed.*reinstall latentkit"):
        registry.get_method("sft")
