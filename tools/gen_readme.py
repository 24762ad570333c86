"""Regenerates the README's tables of integer operators, the ATen op table and the targets from
the registries.

    python -m tools.gen_readme          # rewrite README.md in place
    python -m tools.gen_readme --check  # exit 1 if README.md is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- generated:{} -->", "<!-- end:{} -->"


def ops_table() -> str:
    from ptqpasses_backends.tvm.ptq_ops import HANDLERS
    from ptqpasses.ops import INTEGER_OPS
    from ptqpasses.ops import reference

    rows = ["| op | semantics (first line of the reference kernel's docstring) | TVM |",
            "|---|---|---|"]
    for name in INTEGER_OPS:
        fn = getattr(getattr(reference, name), "_init_fn", None)
        doc = (fn.__doc__ if fn else "").strip().splitlines()
        rows.append(f"| `ptq.{name}` | {doc[0] if doc else ''} | "
                    f"{'yes' if name in HANDLERS else 'no'} |")
    return "\n".join(rows)


def aten_table() -> str:
    """The op table (``ptqpasses.opsets.OPS``), one row per kind and lowering, ATen ops grouped."""
    from ptqpasses.opsets import OPS

    groups: dict[tuple, list[str]] = {}
    for target, op in OPS.items():
        traits = [t for t, on in (("weight", op.weighted), ("fuses ReLU", op.fuses_activation),
                                  ("float output", op.float_output),
                                  ("erased", op.identity)) if on]
        key = (op.kind.value, op.rule or "", ", ".join(f"`ptq.{e}`" for e in op.emits),
               ", ".join(traits))
        groups.setdefault(key, []).append(f"`{target.name()}`".replace("aten::", ""))
    rows = ["| ATen ops | kind | lowering rule | lowers to | also |", "|---|---|---|---|---|"]
    for (kind, rule, emits, traits), names in groups.items():
        rows.append(f"| {' '.join(names)} | {kind} | {rule} | {emits} | {traits} |")
    return "\n".join(rows)


def targets_table() -> str:
    from ptqpasses_backends.tvm.registry import strategy_for
    from ptqpasses_backends.tvm.targets import TARGETS

    rows = ["| target | strategy | TVM target | required features |", "|---|---|---|---|"]
    for name, t in TARGETS.items():
        if t is None:
            rows.append(f"| `{name}` | the best this CPU's flags allow | CPU name from LLVM "
                        "(`llvm_get_system_cpu`), `mattr` from the CPU's flags | |")
        else:
            spec = ", ".join(f"{k}={v}" for k, v in t.spec.items())
            rows.append(f"| `{name}` | `{strategy_for(t).name}` | `{spec}` | "
                        f"{', '.join(t.features)} |")
    return "\n".join(rows)


SECTIONS = {"ops": ops_table, "aten": aten_table, "targets": targets_table}


def render(text: str) -> str:
    for key, make in SECTIONS.items():
        begin, end = BEGIN.format(key), END.format(key)
        if begin not in text or end not in text:
            raise SystemExit(f"README.md lacks the markers {begin} ... {end}")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{make()}\n{end}{tail}"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    current = README.read_text()
    new = render(current)
    if args.check:
        if new != current:
            print("README.md tables are stale: run python -m tools.gen_readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
