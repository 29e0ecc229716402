"""Every pass fits in 150 lines of code (issue 13): what passes share lives in the graph and model layers.

A line of code holds a token other than a comment; docstrings (a module's, class's or function's first
statement when it is a string) do not count, blank lines neither. fold-attention-mask is the exception
the issue allows."""

import ast
import io
import tokenize
from pathlib import Path

import pytest

PASSES = Path(__file__).resolve().parent.parent / "passes"
LIMIT = 150
EXCEPTIONS = {"fold_attention_mask.py"}
NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
            tokenize.ENDMARKER}


def lines_of_code(source: str) -> int:
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    code: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in NOT_CODE:
            code.update(range(token.start[0], token.end[0] + 1))
    return len(code - docstrings)


def test_counting():
    source = '''"""Module
docstring."""
import os  # a comment

# a comment line


def f(x):
    """Docstring."""
    text = """a string
    over two lines"""
    return (x,
            text)
'''
    assert lines_of_code(source) == 6  # import, def, two lines of string, two of return


@pytest.mark.parametrize("path", sorted(p for p in PASSES.glob("*.py") if p.name not in EXCEPTIONS),
                         ids=lambda p: p.name)
def test_pass_fits_in_150_lines_of_code(path):
    count = lines_of_code(path.read_text())
    assert count <= LIMIT, f"{path.name} has {count} lines of code; move what is not the pass's own decision " \
                           "into bertopt.graph or bertopt.model"
