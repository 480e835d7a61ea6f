"""The package's structure, read from the source with ast (no import is executed, so it runs on any machine):

  * no module imports itself in a circle (imports inside functions count too);
  * the mainline has a reading order in which each module imports only the ones before it (minidit/__init__.py
    lists it), and never imports minidit.dev, except backend.get_backend("strict"); the data comes before the models;
  * every @fused reference has a CUDA kernel in cuda_kernels.py registered with @kernel_for and the same signature,
    and every kernel belongs to a @fused reference. (Whether the kernels compute the same numbers is
    tests/test_cuda_kernels.py, on a GPU.)
"""
import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "minidit"



def reading_order():
    """The mainline in reading order, as minidit/__init__.py's docstring lists it (the one place it is written):
    the lines indented by exactly 4 spaces start with one module name, or several separated by ", "."""
    doc = ast.get_docstring(ast.parse((PKG / "__init__.py").read_text()))
    order = []
    for line in doc.splitlines():
        m = re.match(r"    (\w+(?:, \w+)*)  ", line)
        if m and not line.startswith("     "):
            order += m.group(1).split(", ")
    return tuple(order)


ORDER = reading_order()
MODEL_MODULES = ("model", "conditioning", "mmdit", "dynamic", "video", "captions")
ALLOWED_DEV = {("backend", "dev.strict")}  # get_backend("strict"): the test backend chosen by name


def module_name(path):
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)  # "" for the package itself


def imports_of(path):
    """The minidit modules a file imports, anywhere in it, as names relative to the package ("layers", "dev.strict")."""
    name = module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minidit."):
                    found.add(alias.name[len("minidit."):])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                base = [p for p in base if p]
            elif node.module and (node.module == "minidit" or node.module.startswith("minidit.")):
                base, node_module = [], node.module[len("minidit"):].lstrip(".")
                found.update(_targets(base, node_module, node.names))
                continue
            else:
                continue
            found.update(_targets(base, node.module, node.names))
    return {m for m in found if m and m != name}


def _targets(base, module, names):
    """`from <base>.<module> import names`: the module itself, or each name when it is a submodule."""
    prefix = ".".join(base + ([module] if module else []))
    out = set()
    for alias in names:
        candidate = f"{prefix}.{alias.name}" if prefix else alias.name
        if (PKG / (candidate.replace(".", "/") + ".py")).exists() or (PKG / candidate.replace(".", "/")).is_dir():
            out.add(candidate)
        elif prefix:
            out.add(prefix)
    return out


GRAPH = {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_mainline_imports_only_earlier_modules_and_never_dev():
    mainline = {m for m in GRAPH if m and not m.startswith("dev")}
    assert len(set(ORDER)) == len(ORDER) and set(ORDER) == mainline, \
        f"minidit/__init__.py's reading order lists {sorted(set(ORDER) ^ mainline)} wrongly"
    for i, m in enumerate(ORDER):
        for dep in GRAPH[m]:
            if dep.startswith("dev"):
                assert (m, dep) in ALLOWED_DEV, f"{m} imports {dep}: the mainline never imports minidit.dev"
            else:
                assert dep in ORDER[:i], f"{m} imports {dep}, which comes after it in the reading order"
    assert GRAPH["xp"] == set(), "xp.py is the ground floor: it imports nothing of minidit"


def test_data_comes_before_every_model():
    """The dataset layer sits below the models: data.py (and the captions it reads, text.py) imports none of them."""
    assert all(ORDER.index("data") < ORDER.index(m) for m in MODEL_MODULES), f"data comes after one of {MODEL_MODULES}"


def fused_references():
    """{name: (module, ast args)} of every function decorated @fused in the mainline."""
    refs = {}
    for path in PKG.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(getattr(d, "id", None) == "fused" for d in node.decorator_list):
                assert node.name not in refs, f"two @fused functions named {node.name}"
                refs[node.name] = (path.stem, node.args)
    return refs


def kernels():
    """{name: (the reference it names as module.function, ast args)} of every @kernel_for function."""
    found = {}
    for node in ast.parse((PKG / "cuda_kernels.py").read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for d in node.decorator_list:
            if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "kernel_for":
                target = d.args[0]
                found[node.name] = (f"{target.value.id}.{target.attr}", node.args)
    return found


def signature(args):
    return (ast.dump(args.posonlyargs[0]) if args.posonlyargs else None, [a.arg for a in args.args],
            [ast.dump(d) for d in args.defaults], [a.arg for a in args.kwonlyargs], args.vararg, args.kwarg)


def test_every_fused_reference_has_a_kernel_with_its_signature():
    refs, kern = fused_references(), kernels()
    assert len(refs) >= 10, sorted(refs)
    assert sorted(refs) == sorted(kern), (f"@fused without a kernel: {sorted(set(refs) - set(kern))}; "
                                          f"kernels without a @fused reference: {sorted(set(kern) - set(refs))}")
    for name, (module, args) in refs.items():
        target, kargs = kern[name]
        assert target == f"{module}.{name}", f"kernel {name} registers for {target}, the reference is {module}.{name}"
        assert signature(kargs) == signature(args), f"kernel {name} has another signature than {module}.{name}"


@pytest.mark.parametrize("bad", ["def sum_rows(y): pass", "def sum_rows(x, axis=0): pass"])
def test_the_signature_check_can_fail(bad):
    """The comparison above is not vacuous: a renamed or added argument is a different signature."""
    ref = ast.parse("def sum_rows(x): pass").body[0].args
    assert signature(ast.parse(bad).body[0].args) != signature(ref)


# ---------------------------------------------------------------------------------------------------------------
# The commands talk to the model contract only (minidit.contract.Model): nothing in them knows one kind from another
# ---------------------------------------------------------------------------------------------------------------
COMMANDS = ("train", "sample", "threads", "checkpoint")


def model_class_names():
    """The names of the classes defined in the model modules (DiT, DiTSpec, VideoDiT, ...)."""
    return {node.name for m in MODEL_MODULES for node in ast.parse((PKG / f"{m}.py").read_text()).body
            if isinstance(node, ast.ClassDef)}


def kind_branches(source, classes):
    """Where `source` asks what kind of model it holds: isinstance/issubclass against a model class, any mention of a
    model class, hasattr/getattr on a model (an argument naming model, net or m), or a comparison with --model's
    value or a model spec's "kind"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}: {ast.unparse(node)[:80]}"
        if isinstance(node, ast.Name) and node.id in classes:
            found.append(where)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") \
                and node.args and re.search(r"\b(model|net|m)\b", ast.unparse(node.args[0])):
            found.append(where)
        elif isinstance(node, ast.Compare):
            text = ast.unparse(node)
            if re.search(r"\bargs\.model\b|\.kind\b|\[.kind.\]|get\(.kind.\)", text) and "data.kind" not in text:
                found.append(where)
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_the_commands_have_no_branch_on_a_model_kind(command):
    found = kind_branches((PKG / f"{command}.py").read_text(), model_class_names())
    assert not found, f"minidit/{command}.py asks what kind of model it has (use the contract):\n" + "\n".join(found)
    assert not {dep for dep in GRAPH[command] if dep in MODEL_MODULES} - {"model"}, \
        f"minidit/{command}.py imports a model module: kinds are found through minidit.models"


@pytest.mark.parametrize("bad", ["if args.model == 'video': pass", "isinstance(model, VideoDiT)",
                                 "hasattr(model, 'num_frames')", "getattr(run.model, 'x', None)",
                                 "spec.get('kind') != 'dit'", "meta['model']['kind'] == 'dit'"])
def test_the_kind_check_can_fail(bad):
    assert kind_branches(bad, {"VideoDiT"}), bad
    assert not kind_branches("if run.data.kind == 'clips': pass", {"VideoDiT"})


def test_the_readme_tree_lists_every_module_in_the_reading_order():
    """README.md's tree of minidit/ names each mainline module once, in minidit/__init__.py's order."""
    readme = (PKG.parent / "README.md").read_text()
    listed = re.findall(r"^  (\w+)\.py  ", readme, flags=re.M)
    assert tuple(listed) == ORDER, f"README.md's tree lists {listed}, the reading order is {list(ORDER)}"
