"""Field documentation for docs/config.md (tools/dev/gen_config_docs.py): the docstring under each field."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

from mcd_scale.config.schema import Config


def field_docs() -> dict[str, str]:
    """{'section.key': docstring} for the config reference (docs/config.md is generated from it)."""
    docs: dict[str, str] = {}

    def visit(cls, prefix):
        src = inspect.getsource(cls)
        tree = ast.parse(src)
        body = tree.body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                name = node.target.id
                doc = ""
                if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) and isinstance(
                        getattr(body[i + 1], "value", None), ast.Constant):
                    doc = " ".join(str(body[i + 1].value.value).split())
                tp = typing.get_type_hints(cls)[name]
                if dataclasses.is_dataclass(tp):
                    visit(tp, f"{prefix}{name}.")
                else:
                    docs[f"{prefix}{name}"] = doc

    visit(Config, "")
    return docs
