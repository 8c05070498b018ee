"""Sphinx configuration: Markdown pages (MyST), the API reference from docstrings
(autodoc, napoleon), and tables of measured numbers made at build time from the
committed results files (results_tables.py)."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))
import results_tables  # noqa: E402

import featadapt  # noqa: E402

project = "featadapt"
author = "the featadapt authors"
copyright = "the featadapt authors"
release = featadapt.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "demo/**"]  # demo/ holds the demo's results and plots, not pages
myst_heading_anchors = 3

# every unresolved reference is a warning, and the tests build with warnings as
# errors; torch's and PEFT's own types are not documented here
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(torch|peft|transformers|bitsandbytes|torchao|contextlib|pathlib|os)\..*"),
                        (r"py:.*", r"(Optional|Union|Sequence|Iterable|Iterator|Mapping|Callable|Any)(\[.*)?"),
                        (r"py:class", r"PeftConfig|Module")]
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
autodoc_inherit_docstrings = False  # torch.nn.Module.forward's docstring is not ours
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"featadapt {release}"


def expand_results_tables(app, docname, source):
    """Replace each `<!-- results-table: NAME -->` line by its table; an unknown NAME stops the build."""
    source[0] = results_tables.expand(source[0])


def setup(app):
    app.connect("source-read", expand_results_tables)
