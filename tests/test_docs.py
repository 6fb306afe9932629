"""Fast checks of the documentation sources (docs/).

The site itself is built by ``.ci/run`` with ``sphinx-build -W`` (every code
cell executed, warnings are errors); these checks catch, without building, the
mistakes that would let a page drift from the code: a Python block that is not
executed, a page missing from the navigation, a public name missing from the
API page, and measured figures that no longer match their JSON source.
"""

import importlib
import json
import os
import re
import runpy
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def test_docs_pages_exist():
    names = {p.stem for p in PAGES}
    assert {
        "index",
        "getting_started",
        "mnist",
        "pitfalls",
        "faq",
        "migration",
    } <= names
    assert {"distributed", "performance"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_is_executed(page):
    # Plain ```python fences are rendered but never run; pages use {code-cell}
    # (executed by myst-nb) or {literalinclude} of tested files instead.
    text = page.read_text()
    fences = re.findall(r"^```+ *(python|py|python3|ipython)\b", text, re.MULTILINE)
    assert not fences, (
        f"{page.name} has {len(fences)} ```python block(s); use ```{{code-cell}} python"
    )
    if "{code-cell}" in text:
        assert text.startswith("---\nfile_format: mystnb"), (
            f"{page.name} lacks myst-nb front matter"
        )


def test_every_page_is_in_the_toctree():
    index = (DOCS / "index.md").read_text()
    toctree = re.search(r"```\{toctree\}(.*?)```", index, re.DOTALL)
    assert toctree is not None
    entries = {line.strip() for line in toctree.group(1).splitlines()}
    missing = {p.stem for p in PAGES if p.stem != "index"} - entries
    assert not missing, f"pages missing from index.md's toctree: {sorted(missing)}"
    assert "api" in entries


def test_api_page_lists_every_public_name(monkeypatch):
    # conf.py sets PYTHONPATH and JAX_PLATFORMS for the executed pages' kernels.
    for var in ("PYTHONPATH", "JAX_PLATFORMS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
    conf = runpy.run_path(str(DOCS / "conf.py"))
    modules = []
    for modname in conf["public_modules"]():
        try:
            importlib.import_module(modname)
        except ImportError as e:  # an optional framework (docs extra) is missing
            missing = e if isinstance(e, ModuleNotFoundError) else e.__cause__
            assert isinstance(missing, ModuleNotFoundError), e
            assert missing.name is not None and not missing.name.startswith("jaxbn")
            continue
        modules.append(modname)
    text = conf["api_rst"](modules)
    for modname in modules:
        module = importlib.import_module(modname)
        assert f"``{modname}``" in text
        for name in module.__all__:
            assert re.search(
                rf"^(   {name}|\.\. py:data:: {name})$", text, re.MULTILINE
            ), f"{modname}.{name} is not on the API page"
    assert {"jaxbn", "jaxbn.linen", "jaxbn.nnx"} <= set(conf["public_modules"]())


def test_readme_links_to_the_site_pages():
    readme = (DOCS.parent / "README.md").read_text()
    links = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert {f"docs/{p.name}" for p in PAGES if p.stem != "index"} <= links
    for link in links:
        assert (DOCS.parent / link).exists(), link


def test_pitfalls_figure_data():
    record = json.loads((DOCS / "_static" / "pitfalls.json").read_text())
    steps = record["settings"]["steps"]
    assert record["settings"]["momentum"] == 0.999
    assert (DOCS / "_static" / "pitfalls.png").stat().st_size > 10_000
    for layer in ("flax", "jaxbn"):
        assert sorted(int(s) for s in record["results"][layer]) == sorted(steps)
    # The page's claim: after 1000 steps flax's running statistics lose tens of
    # points of test accuracy, jaxbn's stay within a point of batch statistics.
    last = str(max(steps))
    flax, ours = record["results"]["flax"][last], record["results"]["jaxbn"][last]
    assert flax["running"] < ours["batch"] - 0.2
    assert ours["running"] > ours["batch"] - 0.01
