"""The pinned test environment (requirements/): the pins cover what the set-up
installs, every install step uses them, and tools/check_pins.py reports
differences and missing packages."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import check_pins  # noqa: E402


def requirement_names(path):
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(check_pins.normalise(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return names


def extras_names():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        specs += group
    return {check_pins.normalise(re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0]) for s in specs}


def test_every_requirement_is_pinned_exactly():
    pins = check_pins.pinned_versions()
    assert all(re.fullmatch(r"\d[\w.+-]*", v) for v in pins.values()), pins
    wanted = set(requirement_names(ROOT / "requirements" / "test.in"))
    wanted |= set(requirement_names(ROOT / "requirements" / "data-files.in"))
    wanted |= extras_names() - {"torch"}  # torch: the Makefile's TORCH_VERSION
    assert not wanted - set(pins), f"not pinned in constraints.txt: {sorted(wanted - set(pins))}"
    assert "torch" not in pins and not any(n.startswith("nvidia-") for n in pins)


def test_the_known_incompatibility_is_kept_out_of_the_pins():
    # transformers >= 5.24 needs peft >= 0.22 for model.add_adapter (unreleased).
    from packaging.version import Version

    pins = check_pins.pinned_versions()
    if Version(pins["peft"]) < Version("0.22"):
        assert Version(pins["transformers"]) < Version("5.24")


def test_every_install_step_is_pinned():
    """Each pip install of the set-up either takes the constraints file or is
    the torch install (or the offline --no-deps fallback)."""
    script = (ROOT / "tools" / "install-env.sh").read_text()
    makefile = (ROOT / "Makefile").read_text()
    # the Makefile's only own pip install fills a throwaway --target folder (triton for the GPU-version sweep)
    env_installs = [line for line in makefile.splitlines() if "pip install" in line and "--target" not in line]
    assert not env_installs, f"the Makefile installs through tools/install-env.sh: {env_installs}"
    installs = [line.strip() for line in script.splitlines() if "pip install" in line and not line.strip().startswith("#")]
    assert installs
    for line in installs:
        assert ('-c "$pins"' in line or "torch==" in line or "--no-deps --no-build-isolation -e ." in line), line
    assert "offline_fallback\n        \"$py\" -m pip install --no-deps --no-build-isolation -e . || in_tree_install" in script
    assert script.count('"${pinned[@]}"') >= 4
    assert "tools/install-env.sh $(PY) package" in makefile and "tools/install-env.sh $(PY) demo" in makefile


def test_check_pins_reports_differences_and_missing(tmp_path, monkeypatch):
    pins = tmp_path / "constraints.txt"
    import pytest as installed_pytest

    pins.write_text(f"# comment\npytest=={installed_pytest.__version__}\nPackaging==0.0.1\nno-such-package==1.0\n")
    parsed = check_pins.pinned_versions(pins)
    assert parsed == {"pytest": installed_pytest.__version__, "packaging": "0.0.1", "no-such-package": "1.0"}
    found = {name: (pinned, have) for name, pinned, have in check_pins.differences(parsed)}
    assert "pytest" not in found
    assert found["packaging"][0] == "0.0.1" and found["packaging"][1] is not None
    assert found["no-such-package"] == ("1.0", None)


def test_check_pins_command_fails_only_for_a_missing_requirement():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "check_pins.py"), "--require", "test"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "featadapt set-up:" in done.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "check_pins.py"), "--require", "nonsense"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_check_pins_exit_code_for_missing(monkeypatch, capsys):
    name = "featadapt-missing-pkg"
    monkeypatch.setitem(check_pins.REQUIRED, "test", [name])
    monkeypatch.setattr(check_pins, "pinned_versions", lambda path=None: {name: "1.0"})
    assert check_pins.main(["--require", "test"]) == 1
    out = capsys.readouterr()
    assert f"{name}: pinned 1.0, not installed" in out.out and f"missing, and needed: {name}" in out.err
