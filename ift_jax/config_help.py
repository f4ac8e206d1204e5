"""The config tree for `--help`: every field with its value and its comment.

Comments are read from the config files' source (`tokenize` + `ast`): the
comment at the end of an assignment's line(s), and the block of comment lines
right above it (no blank line between), for assignments such as

    c.train.steps = 200  # the trailing comment
    o = c.optimizer      # an alias: o.schedule is optimizer.schedule
    o.schedule, o.warmup_steps = "constant", 0

inside `get_config` (the name it returns is the root); comments inside `if`
branches describe that branch's value and are left out. A field takes its
comment from the first file listed that comments it: the chosen config, then
configs/default.py, which every config builds on. Fields are shown in the
order configs/default.py assigns them, then those other files add.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
from typing import Any, Optional, Sequence


@dataclasses.dataclass
class Comment:
    above: list[str] = dataclasses.field(default_factory=list)
    inline: str = ""


def _comment_lines(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """(inline comments, full-line comments) by line number."""
    inline, full = {}, {}
    code_lines = set()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for tok in tokens:
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (inline if tok.start[0] in code_lines else full)[tok.start[0]] = text
    return inline, full


def _chain(node: ast.AST) -> Optional[tuple[str, list[str]]]:
    """`a.b.c` -> ("a", ["b", "c"]); None for anything else."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def _targets(node: ast.Assign) -> list[ast.AST]:
    found = []
    for target in node.targets:
        found += list(target.elts) if isinstance(target, ast.Tuple) else [target]
    return found


def _get_config(tree: ast.Module) -> Optional[ast.FunctionDef]:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef)
                 and n.name == "get_config"), None)


def _root(function: ast.FunctionDef) -> Optional[str]:
    returns = [n for n in ast.walk(function) if isinstance(n, ast.Return)]
    names = [r.value.id for r in returns if isinstance(r.value, ast.Name)]
    return names[-1] if names else None


def read_comments(path: str) -> tuple[dict[str, Comment], list[str]]:
    """({dotted key: Comment}, keys in assignment order) of a config file's get_config."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    function = _get_config(tree)
    root = _root(function) if function else None
    if root is None:
        return {}, []
    inline, full = _comment_lines(source)
    aliases: dict[str, str] = {root: ""}
    comments: dict[str, Comment] = {}
    order: list[str] = []
    assigns = sorted((n for n in ast.walk(function) if isinstance(n, ast.Assign)),
                     key=lambda n: n.lineno)
    # A comment inside an `if` branch describes that branch's value, not the field.
    unconditional = {id(n) for n in function.body}
    for node in assigns:
        comment = (_comment_of(node, inline, full) if id(node) in unconditional
                   else Comment())
        for target in _targets(node):
            key = _key(target, aliases)
            if key is None:
                continue
            if key not in order:
                order.append(key)
            if (comment.above or comment.inline) and key not in comments:
                comments[key] = comment
        _note_alias(node, aliases)
    return comments, order


def _key(target: ast.AST, aliases: dict[str, str]) -> Optional[str]:
    chain = _chain(target)
    if chain is None or chain[0] not in aliases or not chain[1]:
        return None
    return ".".join(filter(None, [aliases[chain[0]], *chain[1]]))


def _note_alias(node: ast.Assign, aliases: dict[str, str]) -> None:
    """`o = c.optimizer` makes `o` stand for `optimizer`."""
    if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
        return
    chain = _chain(node.value)
    if chain and chain[0] in aliases and chain[1]:
        aliases[node.targets[0].id] = ".".join(filter(None, [aliases[chain[0]], *chain[1]]))


def _comment_of(node: ast.Assign, inline: dict[int, str], full: dict[int, str]) -> Comment:
    text = next((inline[n] for n in range(node.lineno, node.end_lineno + 1) if n in inline), "")
    above, line = [], node.lineno - 1
    while line in full:
        above.insert(0, full[line])
        line -= 1
    return Comment(above, text)


def merged_comments(paths: Sequence[str]) -> tuple[dict[str, Comment], list[str]]:
    """Comments and order from several files, most specific first: the first file that
    comments a key wins; the order is the last file's (the base config's), then the
    keys the others add."""
    comments: dict[str, Comment] = {}
    order: list[str] = []
    for path in paths:
        for key, comment in read_comments(path)[0].items():
            comments.setdefault(key, comment)
    for path in reversed(paths):
        order += [k for k in read_comments(path)[1] if k not in order]
    return comments, order


def format_tree(config: Any, comments: dict[str, Comment], order: Sequence[str]) -> str:
    """The config as an indented tree: `name = value  # comment`, sections as `name:`."""
    lines: list[str] = []
    _format_node(config, "", 1, comments, {k: i for i, k in enumerate(order)}, lines)
    return "\n".join(lines) + "\n"


def _format_node(node: Any, prefix: str, depth: int, comments: dict[str, Comment],
                 rank: dict[str, int], lines: list[str]) -> None:
    indent = "  " * depth
    keys = sorted(node.keys(), key=lambda k: (rank.get(prefix + k, len(rank)), k))
    width = max((len(k) + len(repr(node[k])) for k in keys if not hasattr(node[k], "keys")),
                default=0) + 3
    for name in keys:
        key, value = prefix + name, node[name]
        comment = comments.get(key, Comment())
        lines += [f"{indent}# {text}" for text in comment.above]
        if hasattr(value, "keys"):
            lines.append(f"{indent}{name}:" + (f"  # {comment.inline}" if comment.inline else ""))
            _format_node(value, key + ".", depth + 1, comments, rank, lines)
            continue
        text = f"{name} = {value!r}"
        lines.append(f"{indent}{text:<{width}}  # {comment.inline}" if comment.inline
                     else f"{indent}{text}")
