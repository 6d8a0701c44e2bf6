"""BFCL tool-use scoring by AST match, offline and stdlib-only.

The Berkeley Function-Calling Leaderboard (package ``bfcl-eval``) ships its questions and
possible answers as JSON-lines files. This module reads them straight from the installed
package's directory (it never imports ``bfcl_eval``), prompts a chat model that has no native
tool calling to answer with a Python list of calls (BFCL's "prompting" mode), parses the reply,
and checks it against the ground truth with the semantics of BFCL's AST checker
(``bfcl_eval/eval_checker/ast_eval/ast_checker.py``), reimplemented here:

* a ground-truth call is ``{func_name: {param: [acceptable values...]}}``; ``""`` among the
  acceptable values marks the parameter optional;
* the function name must match (the dotted name, or the same with dots turned into underscores,
  which is how BFCL renames functions for APIs that forbid dots);
* every parameter the schema requires must be present, every parameter given must be both in
  the schema and in the ground truth, and every ground-truth parameter without ``""`` must be
  given;
* values are type-checked against the schema (an int is accepted for a float, a tuple for a
  ``tuple``, one level of element types for arrays), then compared: strings after
  :func:`standardize` (lower-case; spaces and ``,./-_*^`` removed; ``'`` -> ``"``), lists
  element-wise with their string elements standardized, dicts key by key, everything else by
  ``==``;
* ``parallel*`` sets match calls in any order (greedily, as the reference does); the others
  need exactly the expected number of calls.

Parsing is more forgiving than BFCL's decoder (fenced blocks with a language tag, prose around
the list, JSON and OpenAI ``tool_calls`` shapes are accepted) and never ``eval``s model text;
matching is meant to give the reference's verdict on anything both can parse.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SETS = ("simple_python", "multiple", "parallel", "parallel_multiple")
DATA_VERSION = "BFCL_v4"

Call = tuple[str, dict]

_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
_NESTED = ("array", "tuple")
_STRIP = re.compile(r"[ ,./\-_*^]")
_FENCE = re.compile(r"```[^\n`]*\n?(.*?)```", re.DOTALL)
_TAG = re.compile(r"<TOOLCALL>(.*?)</TOOLCALL>", re.DOTALL | re.IGNORECASE)
_CALL_START = re.compile(r"(?<![\w.])[A-Za-z_][\w.]*\(")
_MAX_SCAN = 20_000  # characters of prose scanned for embedded calls
_MAX_STARTS = 100  # candidate starts tried per scan, so hostile prose stays cheap
_MAX_SPAN = 8_000  # longest embedded call (list) looked for
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}

_PERSONA = (
    "You are an expert at composing function calls. You are given a question and a set of "
    "functions you may call. Based on the question, make one or more function calls that "
    "achieve its purpose. If none of the functions can be used, say so. If the question lacks "
    "parameters a function requires, say so too."
)
_FORMAT = (
    "Reply with the function calls only. If you call any function(s), you MUST write them as "
    "a Python list of calls with keyword arguments, in this format:\n"
    "[func_name1(param_name1=param_value1, param_name2=param_value2, ...), func_name2(param=value)]\n"
    "Use Python literals for values (strings in quotes, True/False, lists, dicts). "
    "Do NOT include any other text in the reply."
)


# ---------------------------------------------------------------------------------- data


def data_dir() -> Path:
    """The ``data`` directory of the installed ``bfcl-eval`` package (not imported)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bfcl-eval package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_items(set_name: str) -> list[dict]:
    """The question rows of ``set_name``, each merged with its ``ground_truth``."""
    if set_name not in SETS:
        raise ValueError(f"unknown BFCL set {set_name!r}; expected one of {SETS}")
    root = data_dir()
    name = f"{DATA_VERSION}_{set_name}.json"
    answers = {row["id"]: row for row in _read_jsonl(root / "possible_answer" / name)}
    items = []
    for row in _read_jsonl(root / name):
        answer = answers.get(row["id"])
        if answer is None:
            raise ValueError(f"no possible answer for {row['id']!r} in {name}")
        items.append({**row, "ground_truth": answer["ground_truth"]})
    return items


# ---------------------------------------------------------------------------------- prompt


def tool_prompt(item: dict) -> tuple[str, str]:
    """(system_text, user_text) asking a plain chat model for a Python list of calls."""
    functions = json.dumps(item["function"], indent=4, ensure_ascii=False)
    system = (
        f"{_PERSONA}\n\n{_FORMAT}\n\n"
        f"Here is the list of functions you can call, in JSON format:\n{functions}\n"
    )
    turn = item["question"][0] if item.get("question") else []
    extra_system = [m["content"] for m in turn if m.get("role") == "system"]
    if extra_system:
        system += "\n" + "\n\n".join(extra_system)
    user = "\n\n".join(m["content"] for m in turn if m.get("role") != "system")
    return system, user


# ---------------------------------------------------------------------------------- parsing


def parse_calls(text: str) -> list[Call]:
    """Extract ``(name, kwargs)`` calls from a model reply; ``ValueError`` if none parse.

    Tried in order: the whole reply (stripped of backticks, as BFCL does, and wrapped in
    brackets if needed), each fenced block or ``<TOOLCALL>`` section, the same as JSON; then
    scanning the prose for the first bracketed list of calls, the first JSON call object/list,
    and finally bare calls. Positional arguments are dropped (as BFCL's decoder does).
    """
    if not isinstance(text, str):
        raise ValueError("response is not text")
    for candidate in _candidates(text):
        calls = _python_whole(candidate)
        if calls is None:
            calls = _json_whole(candidate)
        if calls is not None:
            return calls
    scan = text[:_MAX_SCAN]
    for finder in (_scan_python_list, _scan_json, _scan_bare_calls):
        calls = finder(scan)
        if calls:
            return calls
    raise ValueError("no function call found in the response" if text.strip() else "empty response")


def _candidates(text: str) -> Iterator[str]:
    yield text.strip("`\n ")
    for pattern in (_TAG, _FENCE):
        for m in pattern.finditer(text):
            yield m.group(1).strip("`\n ")


def _python_whole(s: str) -> list[Call] | None:
    s = s.strip().strip("'")
    if not s:
        return None
    for src in (s, f"[{s}]"):
        calls = _python_calls(src, allow_empty=True)
        if calls is not None:
            return calls
    return None


def _python_calls(src: str, allow_empty: bool = False) -> list[Call] | None:
    """``src`` as one call or a list/tuple of calls; None if it is not that."""
    try:
        node = ast.parse(src, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    elts: list[ast.expr]
    if isinstance(node, ast.Call):
        elts = [node]
    elif isinstance(node, (ast.List, ast.Tuple)):
        elts = node.elts
    else:
        return None
    calls = [e for e in elts if isinstance(e, ast.Call)]
    if len(calls) < len(elts) or (not elts and not allow_empty):
        return None
    try:
        return [_resolve_call(e) for e in calls]
    except (ValueError, TypeError, ArithmeticError, RecursionError):
        return None


def _call_name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise ValueError("call of something other than a (dotted) name")
    parts.append(func.id)
    return ".".join(reversed(parts))


def _resolve_call(node: ast.Call) -> Call:
    args = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError("**kwargs in a call")
        args[kw.arg] = _resolve_value(kw.value)
    return _call_name(node.func), args


def _resolve_value(node: ast.expr) -> Any:
    """A literal-ish argument value; names become strings (BFCL treats them as variables)."""
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, ast.UnaryOp):
        value = _resolve_value(node.operand)
        if isinstance(node.op, ast.Not):
            return not value
        if isinstance(value, (int, float, complex)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else +value
        raise ValueError("unsupported unary operand")
    if isinstance(node, ast.List):
        return [_resolve_value(v) for v in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_resolve_value(v) for v in node.elts)
    if isinstance(node, ast.Dict):
        keys = [k for k in node.keys if k is not None]
        if len(keys) < len(node.keys):
            raise ValueError("dict unpacking")
        return {_resolve_value(k): _resolve_value(v) for k, v in zip(keys, node.values)}
    if isinstance(node, ast.BinOp):
        return _binop(node)
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _resolve_call(node) if node.keywords else ast.unparse(node)
    if isinstance(node, (ast.Attribute, ast.Subscript, ast.Lambda)):
        return ast.unparse(node)
    raise ValueError(f"unsupported argument syntax: {type(node).__name__}")


def _binop(node: ast.BinOp) -> Any:
    """Constant arithmetic (``2*3``, ``"a" + "b"``), evaluated without ``eval``."""
    fn = _BINOPS.get(type(node.op))
    left, right = _resolve_value(node.left), _resolve_value(node.right)
    numbers = all(isinstance(v, (int, float)) for v in (left, right))
    strings = all(isinstance(v, str) for v in (left, right)) and fn is operator.add
    if fn is None or not (numbers or strings):
        raise ValueError("unsupported arithmetic")
    if fn is operator.pow and abs(right) > 64:
        raise ValueError("exponent too large")
    try:
        return fn(left, right)
    except ArithmeticError as e:
        raise ValueError(f"bad arithmetic: {e}") from None


def _balanced_end(text: str, start: int, opener: str, closer: str) -> int | None:
    """Index just past the ``closer`` matching ``text[start] == opener``; quote-aware."""
    depth, quote, i = 0, "", start
    while i < min(len(text), start + _MAX_SPAN):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == opener:
            depth += 1
        elif ch == closer:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _scan_python_list(text: str) -> list[Call] | None:
    """The first bracketed list of calls in the prose."""
    starts = [i for i, ch in enumerate(text) if ch == "["][:_MAX_STARTS]
    for i in starts:
        end = _balanced_end(text, i, "[", "]")
        calls = _python_calls(text[i:end]) if end else None
        if calls:
            return calls
    return None


def _scan_bare_calls(text: str) -> list[Call] | None:
    """Every call written bare in the prose that has keyword arguments only (or none)."""
    found: list[Call] = []
    pos = tries = 0
    while (m := _CALL_START.search(text, pos)) is not None and tries < _MAX_STARTS:
        tries += 1
        end = _balanced_end(text, m.end() - 1, "(", ")")
        src = text[m.start() : end] if end else ""
        calls = _python_calls(src) if src else None
        if calls and _keyword_only(src):
            found.extend(calls)
            pos = end  # type: ignore[assignment]
        else:
            pos = m.start() + 1
    return found or None


def _keyword_only(src: str) -> bool:
    node = ast.parse(src, mode="eval").body
    return isinstance(node, ast.Call) and not node.args


def _json_whole(s: str) -> list[Call] | None:
    for loader in (json.loads, ast.literal_eval):
        try:
            data = loader(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        calls = _json_calls(data, allow_keyed=True)
        if calls is not None:
            return calls
    return None


def _scan_json(text: str) -> list[Call] | None:
    """Every JSON call object (or list of them) embedded in the prose, in order."""
    decoder = json.JSONDecoder()
    found: list[Call] = []
    i = tries = 0
    while i < len(text) and tries < _MAX_STARTS:
        if text[i] in "[{":
            tries += 1
            try:
                data, end = decoder.raw_decode(text, i)
            except ValueError:
                data, end = None, i + 1
            calls = _json_calls(data, allow_keyed=False) if data is not None else None
            if calls:
                found.extend(calls)
                i = end
                continue
        i += 1
    return found or None


def _json_calls(data: Any, allow_keyed: bool) -> list[Call] | None:
    """Calls from JSON data: {name, arguments|parameters}, OpenAI tool_calls, or lists of them."""
    if isinstance(data, dict):
        if "choices" in data and isinstance(data["choices"], list) and data["choices"]:
            choice = data["choices"][0]
            data = choice.get("message", choice) if isinstance(choice, dict) else choice
        if isinstance(data, dict) and "tool_calls" in data:
            data = data["tool_calls"]
    items = data if isinstance(data, list) else [data]
    if not items:
        return None
    calls = []
    for entry in items:
        call = _json_call(entry, allow_keyed)
        if call is None:
            return None
        calls.append(call)
    return calls


def _json_call(entry: Any, allow_keyed: bool) -> Call | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("function"), dict):  # OpenAI tool call
        entry = entry["function"]
    name = entry.get("name", entry.get("function"))
    if isinstance(name, str):
        args = entry.get("arguments", entry.get("parameters", {}))
        if isinstance(args, str):
            args = _json_args(args)
        return (name, args) if isinstance(args, dict) else None
    if allow_keyed and len(entry) == 1:  # BFCL's decoded form {name: {param: value}}
        ((name, args),) = entry.items()
        if isinstance(args, dict):
            return name, args
    return None


def _json_args(s: str) -> dict | None:
    if not s.strip():
        return {}
    for loader in (json.loads, ast.literal_eval):
        try:
            value = loader(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


# ---------------------------------------------------------------------------------- matching


def standardize(s: str) -> str:
    """BFCL's string normal form: no spaces or ``,./-_*^``, lower case, ``'`` -> ``"``."""
    return _STRIP.sub("", s).lower().replace("'", '"')


def _std(value: Any) -> Any:
    return standardize(value) if isinstance(value, str) else value


def _answer_type(acceptable: list) -> type | None:
    """The type of the first non-optional acceptable value (BFCL's notion of "expected")."""
    for value in acceptable:
        if value != "":
            return type(value)
    return None


def _elements_ok(value: Any, acceptable_item: Any, inner: type) -> bool:
    if not isinstance(acceptable_item, list):
        return True  # the reference only checks element types against list answers
    answer_type = _answer_type(acceptable_item)
    return all(type(v) is inner or type(v) is answer_type for v in value)


def _check_type(
    param: str, value: Any, acceptable: list, expected: type, inner: type | None
) -> tuple[bool, bool, str]:
    """(ok, is_variable, reason). ``is_variable``: the answer is of another type than the schema."""
    answer_type = _answer_type(acceptable)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if inner is None or any(_elements_ok(value, a, inner) for a in acceptable):
            return True, is_variable, ""
        return False, is_variable, f"wrong element type in {param!r}: {value!r}"
    if answer_type is not None and type(value) is answer_type:
        return True, True, ""
    return (
        False,
        is_variable,
        (f"wrong type for {param!r}: expected {expected.__name__}, got {type(value).__name__}"),
    )


def _string_ok(value: str, acceptable: list) -> bool:
    return standardize(value) in [standardize(a) for a in acceptable if isinstance(a, str)]


def _list_ok(value: list, acceptable: list) -> bool:
    got = [_std(v) for v in value]
    # "" (optional) iterates as an empty list, so [] matches an optional parameter, as upstream
    options = [[_std(v) for v in a] for a in acceptable if isinstance(a, (list, tuple, str))]
    return got in options


def _dict_ok(value: dict, answer: dict) -> bool:
    for key, v in value.items():
        if key not in answer:
            return False
        options = answer[key] if isinstance(answer[key], list) else [answer[key]]
        if _std(v) not in [_std(a) for a in options]:
            return False
    return all(key in value or "" in options for key, options in answer.items())


def _any_dict_ok(value: dict, acceptable: list) -> bool:
    return any(isinstance(a, dict) and _dict_ok(value, a) for a in acceptable)


def _list_of_dicts_ok(value: list, acceptable: list) -> bool:
    for answer in acceptable:
        if not isinstance(answer, (list, str)) or len(answer) != len(value):
            continue
        if all(
            isinstance(v, dict) and isinstance(a, dict) and _dict_ok(v, a)
            for v, a in zip(value, answer)
        ):
            return True
    return False


def _check_value(param: str, value: Any, schema: dict, acceptable: list) -> str | None:
    """None when ``value`` is acceptable for ``param``, else the reason it is not."""
    type_name = schema.get("type", "any")
    expected = _TYPES.get(type_name)
    if expected is None:  # a type the reference does not know: compare values only
        return None if value in acceptable else f"wrong value for {param!r}: {value!r}"
    inner = None
    if type_name in _NESTED:
        inner = _TYPES.get(schema.get("items", {}).get("type", ""), None)
    if type_name == "tuple" and type(value) is tuple:
        value = list(value)
    if type_name == "float" and type(value) is int:
        value = float(value)
    ok, is_variable, reason = _check_type(param, value, acceptable, expected, inner)
    if not ok:
        return reason
    if not is_variable:
        if expected is dict:
            ok = _any_dict_ok(value, acceptable)
        elif expected is list and inner is dict:
            ok = _list_of_dicts_ok(value, acceptable)
        elif expected is str:
            ok = _string_ok(value, acceptable)
        elif expected is list:
            ok = _list_ok(value, acceptable)
        else:
            ok = value in acceptable
    else:
        ok = value in acceptable
    return None if ok else f"wrong value for {param!r}: {value!r}, expected one of {acceptable!r}"


def _name_matches(got: str, expected: str) -> bool:
    return got == expected or got == expected.replace(".", "_")


def check_call(function: dict, call: Call, expected: dict) -> str | None:
    """None when ``call`` satisfies one ground-truth call ``{name: {param: [values]}}``."""
    name, args = call
    ((_, answers),) = expected.items()
    if not _name_matches(name, function["name"]):
        return f"wrong function: {name!r}, expected {function['name']!r}"
    params = function.get("parameters", {})
    schema = params.get("properties", {})
    for param in params.get("required", []):
        if param not in args:
            return f"missing required parameter {param!r} of {name!r}"
    for param, value in args.items():
        if param not in schema or param not in answers:
            return f"unexpected parameter {param!r} of {name!r}"
        reason = _check_value(param, value, schema[param], answers[param])
        if reason is not None:
            return reason
    for param, acceptable in answers.items():
        if param not in args and "" not in acceptable:
            return f"missing parameter {param!r} of {name!r}"
    return None


def _function_for(item: dict, name: str) -> dict | None:
    for function in item["function"]:
        if function["name"] == name:
            return function
    return None


def _is_parallel(item: dict) -> bool:
    if "id" in item:
        return "parallel" in str(item["id"]).rsplit("_", 1)[0]
    return len(item["ground_truth"]) > 1


def match(item: dict, calls: list[Call]) -> tuple[bool, str]:
    """(correct, reason): do ``calls`` satisfy ``item``'s ground truth (BFCL AST rules)?"""
    expected = item["ground_truth"]
    if len(calls) != len(expected):
        return False, f"wrong number of calls: {len(calls)}, expected {len(expected)}"
    if not _is_parallel(item):
        function = _function_for(item, next(iter(expected[0])))
        if function is None:
            return False, "ground-truth function missing from the item"
        reason = check_call(function, calls[0], expected[0])
        return (False, reason) if reason else (True, "ok")
    used: set[int] = set()
    for k, answer in enumerate(expected):
        function = _function_for(item, next(iter(answer)))
        if function is None:
            return False, "ground-truth function missing from the item"
        reasons = []
        for i, call in enumerate(calls):
            if i in used:
                continue
            reason = check_call(function, call, answer)
            if reason is None:
                used.add(i)
                break
            reasons.append(reason)
        else:
            return False, f"no call matches expected call {k} ({function['name']}): " + "; ".join(
                reasons
            )
    return True, "ok"


def score_response(item: dict, response: str) -> tuple[bool, str]:
    """Parse ``response`` and match it against ``item``; never raises."""
    try:
        calls = parse_calls(response)
    except ValueError as e:
        return False, f"unparseable: {e}"
    except Exception as e:  # noqa: BLE001 - a scorer must not crash an evaluation run
        return False, f"unparseable: {type(e).__name__}: {e}"
    try:
        return match(item, calls)
    except Exception as e:  # noqa: BLE001 - malformed output of an unexpected shape
        return False, f"unmatchable: {type(e).__name__}: {e}"
