"""The CLI stays thin: each command parses its flags, calls one function that does the work, and renders."""

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "cli"
MAX_LINES = 60


def test_no_function_in_cli_is_longer_than_sixty_lines():
    """Counted from the first line of the body: a command's options are declarations (one line each, and a
    command like ``capacity`` has fifty), its body is what must stay thin."""
    long = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}() has a body of {lines} lines")
    assert not long, "\n".join(long)
