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
    # The table of pages above the toctree lists each of its entries.
    linked = set(re.findall(r"^\| \[[^]]+\]\(([\w.]+)\.(?:md|rst)\)", index, re.M))
    unlisted = sorted({e for e in entries if e and e[0] != ":"} - linked)
    assert not unlisted, f"index.md's table of pages lacks {unlisted}"


def test_design_names_every_module_and_test_file():
    # design.md's tables: each module of jaxbn/ (interop's as `interop/_x`)
    # and each file of tests/, with what it holds or guards.
    design = (DOCS / "design.md").read_text()
    named = set(re.findall(r"`([^`\s]+)`", design))
    package = DOCS.parent / "jaxbn"
    modules = {
        p.relative_to(package).with_suffix("").as_posix() for p in package.rglob("*.py")
    }
    missing = sorted(modules - named)
    assert not missing, f"docs/design.md's module tables lack {missing}"
    files = {
        p.name
        for p in (DOCS.parent / "tests").iterdir()
        if p.suffix in (".py", ".txt") and not p.name.startswith(".")
    }
    missing = sorted(files - named)
    assert not missing, f"docs/design.md does not say what {missing} guard"


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


def _readme_loop() -> str:
    readme = (DOCS.parent / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_readme_opens_with_the_loop_getting_started_runs():
    # The site executes Getting started's first cell while it is built; the
    # README shows the same code, so it is the code that ran.
    page = (DOCS / "getting_started.md").read_text()
    cell = re.search(r"```\{code-cell\} python\n(.*?)```", page, re.DOTALL)
    assert cell is not None
    assert _readme_loop() == cell.group(1)


def test_readme_loop_runs(capsys):
    pytest.importorskip("optax", reason="the loop uses optax (examples extra)")
    pytest.importorskip("orbax.checkpoint", reason="the loop uses orbax")
    exec(compile(_readme_loop(), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "restored equals saved: True" in out
    # The statistics were updated once per step (60 steps).
    assert "count: 60" in out


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


# --- every measured figure from its source ------------------------------------
# A page quotes a measurement either as a {{ substitution }} or a cell computed
# from a committed results file while the site is built (docs/conf.py,
# docs/perf_figures.py, examples/mnist/report.py), or writes it by hand and
# FIGURE_CHECKS below compares it with its source. The scan finds every figure
# with a unit (%, ×, ms, s, minutes) in the prose of the pages; one that neither
# path accounts for fails test_every_figure_has_a_source.

ROOT = DOCS.parent
FIGURE_PAGES = [*PAGES, ROOT / "README.md", ROOT / "examples" / "mnist" / "README.md"]
FIGURE = re.compile(
    r"(?<![\w.^/-])\d+(?:\.\d+)?\s?"
    r"(?:%|×|x(?![\w])|ms\b|s\b|min\b|minutes?\b|seconds?\b)"
)
# The MNIST example's promise (configs/default.py): this accuracy or more.
MNIST_TARGET = 0.992
SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")


def _mnist_results() -> dict:
    from examples.mnist import report

    return report.load()


def _pitfalls() -> dict:
    return json.loads((DOCS / "_static" / "pitfalls.json").read_text())["results"]


def _perf_substitutions() -> dict[str, str]:
    return runpy.run_path(str(DOCS / "perf_figures.py"))["substitutions"]()


def _pct(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f}"


def _decay(count: int, momentum: float) -> float:
    import jax.numpy as jnp

    import jaxbn

    return float(jaxbn.decay(jnp.array(count), momentum, True))


def _pitfalls_row(m: re.Match) -> list[str]:
    row = _pitfalls()
    step = m.group(1)
    j, f = row["jaxbn"][step], row["flax"][step]
    return [
        step,
        *(_pct(v) for v in (j["train"], f["running"], j["running"], j["batch"])),
    ]


def _slow_threshold() -> str:
    header = (ROOT / "tests" / "slow.txt").read_text()
    found = re.search(r"took (\d+(?:\.\d+)?) s or more", header)
    assert found, "tests/slow.txt no longer states its threshold"
    return found.group(1)


# (name, pattern, function): each match's groups must equal the list of texts
# that the function computes from the source.
FIGURE_CHECKS = [
    # The MNIST run: examples/mnist/results.json.
    (
        "mnist-accuracy",
        r"(\d+\.\d+)% test accuracy",
        lambda m: [_mnist_results_figure("accuracy").rstrip("%")],
    ),
    (
        "mnist-target",
        r"margin over (\d+\.\d+)%",
        lambda m: [_pct(MNIST_TARGET)],
    ),
    (
        "mnist-minutes",
        r"MNIST example[^\n]*?about (\d+) minutes",
        lambda m: [f"{_mnist_results()['program_time_s'] / 60:.0f}"],
    ),
    # The benchmark runs: the float32 forward+backward range, flax.linen ÷ jaxbn.
    (
        "speed-range",
        r"(\d+\.\d+)–(\d+\.\d+)× faster",
        lambda m: _perf_substitutions()["perf_fwdbwd_vs_flax"].rstrip("×").split("–"),
    ),
    # The pitfalls run: docs/_static/pitfalls.json.
    (
        "pitfalls-1000-steps",
        r"after 1000 steps, (\d+\.\d)% test\s+accuracy with jaxbn's running "
        r"statistics against (\d+\.\d)%",
        lambda m: [
            _pct(_pitfalls()["jaxbn"]["1000"]["running"]),
            _pct(_pitfalls()["flax"]["1000"]["running"]),
        ],
    ),
    (
        "pitfalls-table",
        r"^\| (\d+) \| (\d+\.\d)% \| (\d+\.\d)% \| (\d+\.\d)% \| (\d+\.\d)% \|$",
        _pitfalls_row,
    ),
    # Arithmetic: the weight 0.999ⁿ of the initial statistics, the warm-up.
    (
        "initial-weight",
        r"(\d+)% after\s+(\d+)",
        lambda m: [f"{100 * 0.999 ** int(m.group(2)):.0f}", m.group(2)],
    ),
    (
        "power",
        r"(0\.\d+)([⁰¹²³⁴⁵⁶⁷⁸⁹]+) ≈ (\d+)%",
        lambda m: [
            m.group(1),
            m.group(2),
            f"{100 * float(m.group(1)) ** int(m.group(2).translate(SUPERSCRIPT)):.0f}",
        ],
    ),
    (
        "first-update",
        r"first update takes (\d+)%",
        lambda m: [f"{100 * (1 - _decay(0, 0.999)):.0f}"],
    ),
    # The test tiers: tests/slow.txt's threshold.
    (
        "slow-tier",
        r"measured at (\d+(?:\.\d+)?) s or more",
        lambda m: [_slow_threshold()],
    ),
]

# Figures written by hand with no results file to check them against: none.
# A page that quotes a measurement renders it from a results file (or drops it).
UNSOURCED: dict[str, set[str]] = {}


def _mnist_results_figure(name: str) -> str:
    from examples.mnist import report

    return report.figures(_mnist_results())[name]


def _prose(page: Path) -> str:
    """The page without code, substitutions, comments and directive options.

    Removed text is replaced by spaces so that line starts stay where they are.
    """
    from examples.mnist import report

    text = page.read_text()

    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    patterns = [
        r"^(```+|~~~+).*?^\1",  # fenced blocks: code cells, sh, directives
        re.escape(report.BEGIN) + ".*?" + re.escape(report.END),  # generated
        r"<!--.*?-->",
        r"`[^`\n]+`",
        r"\{\{.*?\}\}",
    ]
    for pattern in patterns:
        text = re.sub(pattern, blank, text, flags=re.DOTALL | re.MULTILINE)
    return text


@pytest.mark.parametrize("page", FIGURE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_has_a_source(page):
    prose = _prose(page)
    checked: list[range] = []
    wrong = []
    for name, pattern, expected in FIGURE_CHECKS:
        for m in re.finditer(pattern, prose, re.MULTILINE):
            checked.append(range(m.start(), m.end()))
            want = expected(m)
            got = list(m.groups())
            if got != want:
                wrong.append(f"{name}: page says {got}, the source gives {want}")
    assert not wrong, f"{page.name}: figures that differ from their source: {wrong}"
    unsourced = [
        m.group(0)
        for m in FIGURE.finditer(prose)
        if not any(m.start() in span for span in checked)
    ]
    allowed = UNSOURCED.get(page.name, set())
    new = [f for f in unsourced if f not in allowed]
    assert not new, (
        f"{page.name} quotes {new} with no source: render it from a results file "
        "(a {{ substitution }} from docs/conf.py or a computed cell) or add a "
        "check to FIGURE_CHECKS"
    )


def test_figure_scan_finds_what_it_must(tmp_path):
    # The scan and the checks can fail: a stale figure and an unsourced one.
    page = tmp_path / "page.md"
    accuracy = _mnist_results_figure("accuracy")
    page.write_text(
        f"Reached {accuracy} test accuracy, `9.9 s` in code, "
        "{{ mnist_accuracy }}, 0.98–9.99× faster.\n"
    )
    with pytest.raises(AssertionError, match="speed-range"):
        test_every_figure_has_a_source(page)
    page.write_text(f"Reached {accuracy} test accuracy, 3.1 s per step.\n")
    with pytest.raises(AssertionError, match=r"\['3.1 s'\] with no source"):
        test_every_figure_has_a_source(page)
    page.write_text(f"Reached {accuracy} test accuracy, `3.1 s` per step.\n")
    test_every_figure_has_a_source(page)


def test_substitutions_used_by_the_pages_exist(monkeypatch):
    for var in ("PYTHONPATH", "JAX_PLATFORMS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
    conf = runpy.run_path(str(DOCS / "conf.py"))
    names = set(conf["myst_substitutions"])
    assert "substitution" in conf["myst_enable_extensions"]
    for page in PAGES:
        used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", page.read_text()))
        assert used <= names, f"{page.name}: unknown {sorted(used - names)}"
    results = _mnist_results()
    last = results["epochs"][-1]
    assert conf["myst_substitutions"]["mnist_accuracy"] == (
        f"{100 * last['test_accuracy']:.2f}%"
    )


def test_mnist_results_file():
    results = _mnist_results()
    assert [r["epoch"] for r in results["epochs"]] == [1, 2, 3, 4, 5]
    assert results["resumed_from_epoch"] is None  # one uninterrupted run
    machine = results["machine"]
    assert machine["cpu"] and machine["cpu"] != "unknown CPU"
    assert {"python", "jax", "flax"} <= set(machine["versions"])
    assert results["config"]["num_epochs"] == 5
    last = results["epochs"][-1]
    assert last["test_count"] == 10_000
    assert last["test_accuracy"] >= MNIST_TARGET
    assert last["batch_stats"], "the run logged no running statistics"
    for entry in results["eval_only"]:
        assert entry["accuracy"] == entry["reported_accuracy"]
    assert (ROOT / "examples" / "mnist" / "metrics.png").stat().st_size > 10_000


def test_mnist_readme_results_section_is_generated():
    from examples.mnist import report

    text = (ROOT / "examples" / "mnist" / "README.md").read_text()
    assert report.readme_section(_mnist_results()) in text, (
        "examples/mnist/README.md's results section differs from results.json: "
        "run python -m examples.mnist.report --update_readme"
    )
