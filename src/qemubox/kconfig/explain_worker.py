"""Says why options did not get their wanted values, from the kernel's own Kconfig files.

Runs as a separate process (``python -m qemubox.kconfig.explain_worker``) with the
variables the kernel's Makefile would export to Kconfig, because Kconfig's ``$(shell,...)``
macros run compiler probes in the current directory. Reads a JSON request on stdin:
``{"kconfig": path, "config": path, "items": [{"name", "wanted"}...]}`` and writes
``{"reasons": {name: [line, ...]}}`` or ``{"error": message}`` on stdout.
"""

from __future__ import annotations

import difflib
import io
import json
import re
import sys
from typing import Any

import kconfiglib
from kconfiglib import (
    BOOL,
    HEX,
    INT,
    OR,
    STRING,
    TRI_TO_STR,
    TRISTATE,
    Choice,
    Kconfig,
    Symbol,
    expr_items,
    expr_str,
    expr_value,
    split_expr,
)

# Linux 6.11+ spells `option modules` as a bare `modules` attribute, which kconfiglib 14.1
# does not know; the rewrite keeps its meaning.
_BARE_MODULES_RE = re.compile(r"(?m)^(\s*)modules\s*$")


class KernelKconfig(Kconfig):
    """kconfiglib's parser, taught the syntax of current kernels."""

    def _open(self, filename, mode):  # type: ignore[override]
        fh = super()._open(filename, mode)
        if "r" not in mode:
            return fh
        with fh:
            text = fh.read()
        return io.StringIO(_BARE_MODULES_RE.sub(r"\1option modules", text))


def _loc(sym: Symbol | Choice) -> str:
    node = sym.nodes[0]
    return f"{node.filename}:{node.linenr}"


def _item_values(expr: Any) -> str:
    """``A=y, B=n`` for the symbols an expression mentions."""
    parts = []
    for item in sorted(expr_items(expr), key=lambda s: getattr(s, "name", "") or ""):
        if isinstance(item, Symbol) and not item.is_constant:
            value = item.str_value if item.nodes else "n (undefined)"
            parts.append(f"{item.name}={value}" if value else f'{item.name}=""')
    return ", ".join(parts)


def _with_values(expr: Any) -> str:
    values = _item_values(expr)
    return f"{expr_str(expr)}" + (f" [{values}]" if values else "")


def _active_terms(expr: Any, above: int) -> list[str]:
    """The OR-terms of a select/imply expression whose value exceeds ``above``."""
    return [
        f"{_with_values(term)} = {TRI_TO_STR[expr_value(term)]}"
        for term in split_expr(expr, OR)
        if expr_value(term) > above
    ]


def _prompts(sym: Symbol) -> list[Any]:
    return [node for node in sym.nodes if node.prompt]


def _prompt_reason(sym: Symbol) -> str | None:
    """Why the user cannot set the symbol: no prompt, or a prompt whose condition is false."""
    prompts = _prompts(sym)
    if not prompts:
        return (
            f"CONFIG_{sym.name} has no prompt ({_loc(sym)}): it cannot be set directly, "
            "only through select or its default"
        )
    conds = [node.prompt[1] for node in prompts]
    if all(expr_value(c) == 0 for c in conds):
        shown = " or ".join(_with_values(c) for c in conds)
        return f"its prompt is hidden: the condition {shown} is n ({_loc(sym)})"
    return None


def _defaults(sym: Symbol) -> list[str]:
    out = []
    for value, cond in sym.defaults:
        state = "active" if expr_value(cond) else "inactive"
        if cond is sym.kconfig.y:
            out.append(f"default {expr_str(value)}")
        else:
            out.append(f"default {expr_str(value)} if {_with_values(cond)} ({state})")
    return out


def _explain_raise(sym: Symbol, wanted: int) -> list[str]:
    """Why a bool/tristate stayed below the wanted value."""
    reasons = []
    dep = expr_value(sym.direct_dep)
    if dep < wanted:
        reasons.append(
            f"unmet dependency: depends on {_with_values(sym.direct_dep)}, "
            f"which is {TRI_TO_STR[dep]} ({_loc(sym)})"
        )
        return reasons
    if sym.choice is not None:
        choice = sym.choice
        chosen = choice.selection
        title = choice.nodes[0].prompt[0] if choice.nodes[0].prompt else "choice"
        if chosen is not None and chosen is not sym:
            reasons.append(
                f"lost the choice {title!r} ({_loc(choice)}): CONFIG_{chosen.name} was chosen; "
                f"set CONFIG_{chosen.name} to n or put CONFIG_{sym.name}=y after it"
            )
            return reasons
    hidden = _prompt_reason(sym)
    if hidden:
        reasons.append(hidden)
        reasons += [f"it would follow: {d}" for d in _defaults(sym)]
        if sym.rev_dep is not sym.kconfig.n:
            reasons.append(f"it can be selected by: {expr_str(sym.rev_dep)}")
        return reasons
    if wanted == 1 and sym.kconfig.modules.tri_value == 0:
        reasons.append("CONFIG_MODULES is n, so nothing can be =m")
        return reasons
    reasons.append(
        f"it can be set to {'/'.join(TRI_TO_STR[v] for v in sym.assignable) or 'nothing'} "
        "now; a later assignment or a base config probably overrode it"
    )
    return reasons


def _explain_lower(sym: Symbol, wanted: int) -> list[str]:
    """Why a bool/tristate went above the wanted value."""
    reasons = []
    if wanted == 1 and sym.kconfig.modules.tri_value == 0:
        reasons.append("CONFIG_MODULES is n, so m turns into y")
    selectors = _active_terms(sym.rev_dep, wanted)
    if selectors:
        reasons.append("forced by select from: " + "; ".join(selectors))
    implied = _active_terms(sym.weak_rev_dep, wanted)
    if implied and not _prompts(sym):
        reasons.append("forced by imply from: " + "; ".join(implied))
    if sym.choice is not None and sym.choice.selection is sym and wanted == 0:
        others = [f"CONFIG_{s.name}" for s in sym.choice.syms if s is not sym and s.visibility]
        reasons.append(
            f"it is the chosen member of its choice ({_loc(sym.choice)}); a choice always "
            f"has one: set another member to y instead ({', '.join(others) or 'none available'})"
        )
    if not reasons:
        hidden = _prompt_reason(sym)
        if hidden:
            reasons.append(hidden)
            reasons += [f"it follows: {d}" for d in _defaults(sym) if "(inactive)" not in d]
    if not reasons:
        reasons.append("a later assignment or a base config probably overrode it")
    return reasons


def _explain_value(sym: Symbol, wanted: str) -> list[str]:
    """Why an int/hex/string did not take the wanted value."""
    reasons = []
    dep = expr_value(sym.direct_dep)
    if dep == 0:
        return [f"unmet dependency: depends on {_with_values(sym.direct_dep)} ({_loc(sym)})"]
    hidden = _prompt_reason(sym)
    if hidden:
        reasons.append(hidden)
        reasons += [f"it follows: {d}" for d in _defaults(sym) if "(inactive)" not in d]
        return reasons
    if sym.type in (INT, HEX):
        try:
            number = int(wanted, 16 if sym.type == HEX else 10)
        except ValueError:
            return [f"{wanted!r} is not a valid {kconfiglib.TYPE_TO_STR[sym.type]} value"]
        for low, high, cond in sym.ranges:
            if expr_value(cond):
                base = 16 if sym.type == HEX else 10
                lo, hi = int(low.str_value, base), int(high.str_value, base)
                if not lo <= number <= hi:
                    reasons.append(
                        f"{wanted} is outside its range {low.str_value}..{high.str_value} "
                        f"({_loc(sym)})"
                    )
    elif sym.type == STRING and not wanted.startswith('"'):
        reasons.append("it is a string option: the value must be quoted")
    if not reasons:
        reasons.append("a later assignment or a base config probably overrode it")
    return reasons


def explain(kconf: Kconfig, name: str, wanted: str, arch: str = "?") -> list[str]:
    sym = kconf.syms.get(name)
    if sym is None or not sym.nodes:
        defined = [n for n, s in kconf.syms.items() if s.nodes and n != name]
        close = difflib.get_close_matches(name, defined, n=3, cutoff=0.8)
        hint = f"; did you mean {', '.join('CONFIG_' + c for c in close)}?" if close else ""
        return [
            f"CONFIG_{name} does not exist in this kernel (for ARCH={arch}): "
            f"a typo, or renamed or removed{hint}"
        ]
    if sym.type in (BOOL, TRISTATE):
        if wanted not in ("y", "m", "n"):
            return [
                f"CONFIG_{name} is a {kconfiglib.TYPE_TO_STR[sym.type]} option: "
                f"{wanted} is not y, m or n"
            ]
        want = kconfiglib.STR_TO_TRI[wanted]
        if sym.type == BOOL and want == 1:
            return [f"CONFIG_{name} is a bool option: it cannot be m, only y or n ({_loc(sym)})"]
        if want > sym.tri_value:
            return _explain_raise(sym, want)
        return _explain_lower(sym, want)
    if wanted in ("y", "m", "n") and sym.type != STRING:
        return [f"CONFIG_{name} is a {kconfiglib.TYPE_TO_STR[sym.type]} option, not bool"]
    return _explain_value(sym, wanted)


def main() -> None:
    request = json.load(sys.stdin)
    try:
        kconf = KernelKconfig(request["kconfig"], warn=False)
        kconf.load_config(request["config"])
    except (kconfiglib.KconfigError, OSError) as err:
        message = " ".join(str(err).split())
        json.dump({"error": f"cannot read the kernel's Kconfig: {message}"}, sys.stdout)
        return
    arch = request.get("arch", "?")
    reasons = {
        item["name"]: explain(kconf, item["name"], item["wanted"], arch)
        for item in request["items"]
    }
    json.dump({"reasons": reasons}, sys.stdout)


if __name__ == "__main__":
    main()
