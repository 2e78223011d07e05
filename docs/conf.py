"""Sphinx configuration: the API reference from the docstrings, the user guide, and the
tutorials rendered from their committed outputs (never executed here).

Build: ``python3 -m sphinx -W --keep-going -b html docs docs/_build/html`` (what ``.ci/run``
runs). ``nitpicky`` makes every unresolved reference to this project's own objects a warning,
and ``-W`` an error; references into torch, Pyro, numpy and the standard library are not
checked (no intersphinx: the build needs no network).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # pyro_emvae and the model zoo (models/) from this checkout
os.environ.setdefault("MPLBACKEND", "Agg")

import pyro_emvae

project = "pyro_emvae"
author = "pyro_emvae contributors"
copyright = "pyro_emvae contributors"
release = version = pyro_emvae.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# The tutorials are rendered from the outputs committed in tutorials/*.ipynb (a full-size run:
# docs/execute_tutorials.py); the docs build never executes a notebook.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

exclude_patterns = ["_build", "tutorials/README.md", "execute_tutorials.py", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# A broken reference to our own API is an error; references to other projects are not
# resolved (no intersphinx), so they are not checked.
nitpicky = True
# Annotations autodoc shortens to a bare name of another project's class (``nn.Module``,
# ``pyro.optim.PyroOptim``; the structured distributions' annotations: ``torch.Tensor``, Pyro's
# ``ExpandedDistribution`` and torch's ``_DependentProperty``).
nitpick_ignore = [
    ("py:class", "Module"),
    ("py:class", "PyroOptim"),
    ("py:class", "Tensor"),
    ("py:class", "ExpandedDistribution"),
    ("py:class", "_DependentProperty"),
]
nitpick_ignore_regex = [
    (r"py:.*", r"(?!pyro_emvae\b|models\b).*\..*"),  # dotted names outside this project
]
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = f"pyro_emvae {release}"
html_static_path: list[str] = []


def _zoo_modules(app, docname, source):
    """The model zoo page documents every module of models/, found at build time, so a model
    added there appears without editing the page (and its docstrings are checked with it)."""
    if docname != "api/models":
        return
    names = sorted(p.stem for p in (ROOT / "models").glob("[a-z]*.py"))
    source[0] += "".join(f"\n.. automodule:: models.{n}\n   :members:\n" for n in names)


def _lookup(path: str):
    """The object a dotted name of this project names, or None (imports the longest module
    prefix, then walks attributes)."""
    import importlib

    parts = path.split(".")
    if parts[0] not in ("pyro_emvae", "models"):
        return None
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_own(app, env, node, contnode):
    """References the Python domain cannot find, resolved honestly.

    A public object is documented once, under ``pyro_emvae.<name>``; docstrings name it by its
    defining module too (``pyro_emvae.evaluate.score``, ``pyro_emvae.fit.FitResult.bic``) or
    bare (``ModelInputError``): those are linked to its page. A reference to an internal object
    that exists (``pyro_emvae.track.Tracked``, a private helper) is kept as code, unlinked. A
    name that resolves to nothing stays unresolved: nitpicky warns and ``-W`` fails the build.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    modname, clsname = node.get("py:module"), node.get("py:class")
    public = set(pyro_emvae.__all__)
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part in public:  # pyro_emvae.<module>.<Name>[.attr] or <Name>[.attr]
            new = ".".join(["pyro_emvae", *parts[i:]])
            domain = env.get_domain("py")
            for typ in ("obj", node["reftype"]):
                found = domain.resolve_xref(
                    env, node["refdoc"], app.builder, typ, new, node, contnode
                )
                if found is not None:
                    return found
    candidates = [target]
    # the module and class whose docstring holds the reference ("docstring of a.b.C.meth")
    import re

    where = re.search(r"docstring of ([\w.]+)", node.source or "")
    if where:
        path = where.group(1).split(".")
        candidates += [".".join([*path[:i], target]) for i in range(len(path), 0, -1)]
    if modname:
        candidates += [f"{modname}.{target}"]
        if clsname:
            candidates += [f"{modname}.{clsname}.{target}"]
    if any(_lookup(c) is not None for c in candidates):
        return contnode
    return None


def setup(app):
    app.connect("source-read", _zoo_modules)
    app.connect("missing-reference", _resolve_own)
