"""The package's shape: imports that only go down, every option everywhere.

These guard the layout that ``docs/design.md`` describes, so that a change
that breaks it fails here rather than in a review months later. (Caps on the
lines of a function were removed: code was packed to fit them. Whether a
function reads in one go is a reviewer's call, not a count.)
"""

import ast
import dataclasses
import inspect
import pkgutil
from pathlib import Path

import pytest

import jaxbn
import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx
from jaxbn import _config

PACKAGE = Path(jaxbn.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))

# Each module's layer, from the ground up: a module imports only from lower
# layers (functions' local imports included), so there is no cycle.
LAYERS = [
    {"_hyperparams", "_xla_cpu", "_trees", "_sums"},
    {"_inputs", "_passes", "_converged"},
    {"_config", "_normalize", "_statistics"},
    {"_types"},
    {"_running", "_training"},
    {"_ghost"},
    {"_apply"},
    {"_layer", "_pipeline"},
    {"linen", "nnx", "equinox", "interop"},
    {"_describe", "_record"},
    {"_fold", "_recalibrate"},
    {"__init__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    """``_layer`` for jaxbn/_layer.py; ``interop`` for anything in jaxbn/interop/."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _jaxbn_imports(path: Path) -> set[str]:
    """The jaxbn modules ``path`` imports, at module level or in functions."""
    name = _module_name(path)
    in_subpackage = path.parent != PACKAGE
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            level = node.level - (1 if in_subpackage else 0)
            if node.level and level == 0 and in_subpackage:
                continue  # within the subpackage itself
            if node.level:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("jaxbn."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxbn."):
                    found.add(alias.name.split(".")[1])
    found.discard(name)
    return found


def test_every_module_has_a_layer():
    names = {_module_name(p) for p in SOURCES}
    assert names == set(LAYER_OF), (
        f"modules without a layer: {sorted(names - set(LAYER_OF))}; layers "
        f"without a module: {sorted(set(LAYER_OF) - names)}"
    )


def test_imports_only_go_down():
    upward = []
    for path in SOURCES:
        here = LAYER_OF[_module_name(path)]
        for target in _jaxbn_imports(path):
            if LAYER_OF[target] >= here:
                upward.append(f"{path.relative_to(PACKAGE)} -> {target}")
    assert not upward, f"imports that run up (or sideways into a cycle): {upward}"


def test_import_reader_sees_every_kind_of_import():
    assert {"_pipeline", "_config", "_converged"} <= _jaxbn_imports(
        PACKAGE / "linen.py"
    )
    # A function's local import (recalibrate reads the adapters lazily).
    assert "nnx" in _jaxbn_imports(PACKAGE / "_recalibrate.py")
    # From inside the interop subpackage, ``..`` is jaxbn.
    assert _jaxbn_imports(PACKAGE / "interop" / "_common.py") == {"_converged"}


def test_package_docstring_lists_every_public_module():
    public = [
        m.name
        for m in pkgutil.iter_modules(jaxbn.__path__)
        if not m.name.startswith("_")
    ]
    assert set(public) == {"equinox", "interop", "linen", "nnx"}
    for name in public:
        assert f"``jaxbn.{name}``" in (jaxbn.__doc__ or ""), name


def test_config_and_factory_take_the_same_options():
    factory = list(inspect.signature(jaxbn.batch_norm).parameters)
    fields = [f.name for f in dataclasses.fields(jaxbn.BatchNormConfig) if f.init]
    assert factory == fields
    kinds = [p.kind for p in inspect.signature(jaxbn.batch_norm).parameters.values()]
    assert kinds[0] is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert set(kinds[1:]) == {inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize(
    "adapter",
    [
        jaxbn.linen.BatchNorm,
        jaxbn.nnx.BatchNorm.__init__,
        jaxbn.equinox.BatchNorm.__init__,
    ],
    ids=["linen", "nnx", "equinox"],
)
def test_every_adapter_takes_every_variant(adapter):
    if inspect.isclass(adapter):  # a linen dataclass: its fields
        names = {f.name for f in dataclasses.fields(adapter)}  # pyright: ignore
    else:
        names = set(inspect.signature(adapter).parameters)
    missing = set(_config.VARIANTS) - names
    assert not missing, f"{adapter} lacks {sorted(missing)}"
    # VARIANTS is every core option an adapter does not rename.
    renamed = {
        "axis",
        "momentum",
        "epsilon",
        "center",
        "scale",
        "warmup",
        "allow_one_value",
        "axis_name",
        "axis_index_groups",
        "dtype",
        "param_dtype",
        "scale_init",
        "bias_init",
    }
    core = set(inspect.signature(jaxbn.batch_norm).parameters)
    assert core - renamed == set(_config.VARIANTS)


# A value other than the default for each variant, with the options it needs.
VARIANT_VALUES = {
    "running_var": ("unbiased", {}),
    "renorm": (True, {}),
    "rmax": (2.0, {"renorm": True}),
    "dmax": (1.0, {"renorm": True}),
    "renorm_momentum": (0.5, {"renorm": True}),
    "virtual_batch_size": (4, {}),
    "eval_mode": ("batch", {}),
    "zero_masked": (True, {}),
    "debias": ("mean", {"warmup": False}),
}


def test_variant_values_cover_every_variant():
    assert set(VARIANT_VALUES) == set(_config.VARIANTS)
    for name, (value, _) in VARIANT_VALUES.items():
        assert value != getattr(jaxbn.BatchNormConfig, name), name


def _adapter_config(adapter: str, options: dict) -> jaxbn.BatchNormConfig:
    if adapter == "core":
        return jaxbn.batch_norm(**options).config
    if adapter == "linen":
        return jaxbn.linen.BatchNorm(**options).config
    if adapter == "nnx":
        from flax import nnx

        return jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **options).config
    return jaxbn.equinox.BatchNorm(3, **options).config


@pytest.mark.parametrize("adapter", ["core", "linen", "nnx", "equinox"])
@pytest.mark.parametrize("name", sorted(VARIANT_VALUES))
def test_each_variant_reaches_the_configuration(adapter, name):
    # Values, not signatures: an adapter that took an option and dropped it
    # (or passed it under another name) leaves the default here.
    value, needs = VARIANT_VALUES[name]
    config = _adapter_config(adapter, {name: value, **needs})
    assert getattr(config, name) == value
    base = _adapter_config(adapter, needs)
    # renorm=True fills in the defaults of its clips and momentum.
    derived = {"rmax", "dmax", "renorm_momentum"} if name == "renorm" else set()
    for other in set(_config.VARIANTS) - {name} - derived:
        assert getattr(config, other) == getattr(base, other), other


def test_adapter_config_refuses_a_missing_variant():
    from jaxbn import _pipeline

    variants = {name: getattr(jaxbn.BatchNormConfig, name) for name in _config.VARIANTS}
    del variants["debias"]
    with pytest.raises(TypeError, match="debias"):
        _pipeline.adapter_config(
            axis=-1,
            momentum=0.9,
            epsilon=1e-5,
            center=True,
            scale=True,
            warmup=None,
            axis_name=None,
            variants=variants,
        )
