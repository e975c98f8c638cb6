"""cp/ keeps no module-level mutable state (registries and caches belong to an object the caller holds)."""

import ast
from pathlib import Path

import megatron_dsv.cp

MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque"}


def _mutable(node) -> bool:
    if isinstance(node, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        return name in MUTABLE_CALLS
    return False


def test_cp_modules_hold_no_module_level_mutable_state():
    found = []
    for path in sorted(Path(megatron_dsv.cp.__file__).parent.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                targets, value = [t.id for t in node.targets if isinstance(t, ast.Name)], node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                targets, value = [node.target.id], node.value
            else:
                continue
            if _mutable(value) and targets != ["__all__"]:
                found.append(f"{path.name}:{node.lineno} {targets}")
    assert not found, f"module-level mutable state in megatron_dsv/cp: {found}"


def test_the_check_sees_a_cache():
    tree = ast.parse('_CACHE: Dict[int, str] = {}\nX = defaultdict(list)\n__all__ = ["a"]\nN = 3\n')
    flags = [_mutable(n.value) for n in tree.body]
    assert flags == [True, True, True, False]  # __all__ is a list too; the test above exempts it by name
