"""No function over 80 lines outside the tests (DEVELOPERS.md): a longer one is split where its parts have names."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMIT = 80
SKIPPED = {"tests", "site", "runs", "node_modules"}  # and hidden folders (.venv, .git, .ci's caches)


def long_functions(source: str, name: str = "<source>", limit: int = LIMIT):
    """``name:line function (n lines)`` for every function or method, nested ones included, longer than ``limit``
    lines from its ``def`` to its last line (decorators not counted)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return out


def python_files():
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED
                         and not (top == ROOT and d == "shared"))
        yield from (os.path.join(top, f) for f in sorted(files) if f.endswith(".py"))


def test_no_function_over_80_lines_outside_the_tests():
    files = list(python_files())
    assert any(f.endswith(os.path.join("anystory", "generate.py")) for f in files)  # the walk reaches the code
    too_long = [entry for path in files
                for entry in long_functions(open(path, encoding="utf-8").read(), os.path.relpath(path, ROOT))]
    assert too_long == []


def test_the_check_names_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    source = f"class A:\n    @staticmethod\n    def short():\n        pass\n\n    def long(self):\n{body}"
    assert long_functions(source.replace("\n    x", "\n        x"), "a.py") == ["a.py:6 long (81 lines)"]
    assert long_functions(source.replace("\n    x", "\n        x"), "a.py", limit=81) == []
