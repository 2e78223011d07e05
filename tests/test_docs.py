"""The documentation's promises, checked: every public name has a docstring with a runnable
example, every example in the library and the model zoo runs and prints what it shows
(doctest), every public name has a place in the API reference, and the README keeps what
it promises and links into the docs.

The Sphinx build itself (``-W``: a broken reference is an error) runs in ``.ci/run``.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import pyro_emvae

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    names = ["pyro_emvae"]
    names += [
        m.name
        for m in pkgutil.walk_packages(pyro_emvae.__path__, "pyro_emvae.")
        if m.name != "pyro_emvae.__main__"
    ]
    names += sorted(f"models.{p.stem}" for p in (ROOT / "models").glob("[a-z]*.py"))
    return names


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            # an object imported into several modules is tested once, where it is defined
            if test.examples and _defined_in(test, module):
                tests.append(test)
    return sorted(tests, key=lambda t: t.name)


def _defined_in(test: doctest.DocTest, module) -> bool:
    obj = module
    for part in test.name.split(".")[len(module.__name__.split(".")) :]:
        obj = getattr(obj, part, None)
    owner = getattr(obj, "__module__", module.__name__)
    return obj is module or owner == module.__name__ or not isinstance(owner, str)


DOCTESTS = _doctests()


def _zoo_public() -> list[tuple[str, object]]:
    out = []
    for path in sorted((ROOT / "models").glob("[a-z]*.py")):
        module = importlib.import_module(f"models.{path.stem}")
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if obj.__module__ == module.__name__:
                out.append((f"{module.__name__}.{name}", obj))
    return out


def _public() -> list[tuple[str, object]]:
    out = [(f"pyro_emvae.{n}", getattr(pyro_emvae, n)) for n in pyro_emvae.__all__]
    return [(n, o) for n, o in out if not n.endswith("__version__")] + _zoo_public()


def test_every_public_name_has_a_docstring_with_an_example():
    """``pyro_emvae.__all__`` and every public function and class of the model zoo."""
    missing = [name for name, obj in _public() if ">>> " not in (inspect.getdoc(obj) or "")]
    assert not missing, f"public names without a docstring example: {missing}"


def test_every_public_name_is_in_the_api_reference():
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.rst"))
    documented = set(re.findall(r"\.\. auto(?:class|function|exception):: (\w+)", pages))
    public = {n for n in pyro_emvae.__all__ if n != "__version__"}
    assert public - documented == set(), "add them to a page in docs/api/"
    assert documented - public == set(), "documented but not public"


def test_the_doctests_are_collected():
    """Guard against a collector that silently finds nothing: the examples of ``fit``,
    ``ExactEStep`` and a zoo model are among them."""
    names = {t.name for t in DOCTESTS}
    assert {"pyro_emvae.fit.fit", "pyro_emvae.estep.ExactEStep", "models.gmm.gmm_model"} <= names
    assert len(DOCTESTS) >= 60


@pytest.fixture
def _rule_registry():
    """An example may register a closed-form rule (``register_rule``): undo it afterwards, so
    the tests that follow see the built-in rules only."""
    from pyro_emvae import rules

    tables = [getattr(rules, n) for n in ("RULES", "HANDLED", "ROLES", "MAXIMIZERS")]
    saved = [dict(t) for t in tables]
    yield
    for table, old in zip(tables, saved, strict=True):
        table.clear()
        table.update(old)


@pytest.mark.usefixtures("_rule_registry")
@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example(test: doctest.DocTest):
    """Each docstring's example, run as doctest runs it (float64, seed 0, empty param store:
    ``conftest.py``), must print what the docstring shows."""
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report: list[str] = []
    test.globs = dict(test.globs)  # a fresh namespace per run
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_readme_is_a_landing_page_that_links_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 120
    for heading in ("## Fifteen lines", "## What `fit` runs", "## Benchmarks"):
        assert heading in readme
    assert "sphinx-build -W" in readme or "python3 -m sphinx -W" in readme
    # every docs page the README links to exists
    for page in re.findall(r"\(docs/([\w/]+)\.md\)", readme):
        assert (ROOT / "docs" / f"{page}.md").exists(), page


@pytest.mark.usefixtures("_rule_registry")
def test_custom_rule_page_example_registers_a_rule_that_em_uses():
    """docs/guide/custom_rule.md's code block, as printed, makes a Gamma mixture's rates
    closed-form, and one EM step from it gives the page's formula β = α Σw / Σ w x."""
    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_emvae import EMOptim, ExactEStep, fit

    page = (ROOT / "docs" / "guide" / "custom_rule.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.DOTALL).group(1)
    exec(compile(code, "custom_rule.md", "exec"), {})  # noqa: S102 (the page is ours)

    def model(x):
        rates = pyro.param("rates", torch.tensor([1.0, 2.0]), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample(
                "z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"}
            )
            pyro.sample("x", dist.Gamma(3.0, rates[z]), obs=x)

    x = dist.Gamma(3.0, torch.tensor([0.5, 5.0])).sample((100,)).flatten()
    assert EMOptim().plan(ExactEStep(model), (x,), {}).closed_form == ["rates"]
    w = ExactEStep(model).marginals(x)["z"]
    fit(model, ExactEStep(model), x, max_iter=1, tol=0)
    expected = 3.0 * w.sum(0) / (w * x[:, None]).sum(0)
    assert torch.allclose(pyro.param("rates").detach(), expected, rtol=1e-10)
