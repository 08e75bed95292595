"""``hf-contmerge``: merge, methods, inspect, demo.

The ``merge`` flags are generated from :class:`MergeOptions`, so the CLI, recipes and the Python API
share one definition. A refused input prints one paragraph naming the input and the fix, and exits
with status 2; nothing is written. Messages go through ``logging`` (logger ``hf_contmerge``), to
which the CLI attaches a stderr handler. Nothing heavy is imported until a command runs: ``--help``
needs neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ContMergeError
from .methods.registry import method_class, method_names
from .options import MergeOptions, load_recipe

# Fields with hand-written flags (or none) instead of the generated ones.
SPECIAL = {"params", "token"}


def _methods_help() -> str:
    lines = []
    for m in map(method_class, method_names()):
        flag = " [EXPERIMENTAL]" if m.experimental else (" [interpretation]" if m.interpretation else "")
        lines.append(f"  {m.name:<16} {m.summary}{flag}")
    return "methods:\n" + "\n".join(lines) + "\n\nParameters and defaults: `hf-contmerge methods`."


def _add_option_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> None:
    for name, field in MergeOptions.model_fields.items():
        if name in SPECIAL or name in skip or (only is not None and name not in only):
            continue
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": field.description}
        ann = field.annotation
        origin = typing.get_origin(ann)
        if ann is bool:
            kwargs["action"] = "store_true"
        elif origin is list:
            kwargs["nargs"] = "+"
            kwargs["metavar"] = {"data": "SPEC", "eval_data": "SPEC", "eval_harness": "TASK"}.get(name, "SRC")
        elif origin is typing.Literal:
            kwargs["choices"] = typing.get_args(ann)
        elif ann in (int, float):
            kwargs["type"] = ann
        if not field.is_required() and ann is not bool and field.default is not None and origin is not list:
            kwargs["help"] = f"{field.description} (default: {field.default})"
        parser.add_argument(flag, **kwargs)
    if only is not None:
        parser.add_argument("--token", dest="token", default=argparse.SUPPRESS,
                            help="Hub token (default: HF_TOKEN or your saved login). Never printed or written.")
        return
    if skip:
        parser.add_argument("--token", dest="token", default=argparse.SUPPRESS,
                            help="Hub token (default: HF_TOKEN or your saved login). Never printed or written.")
        parser.add_argument("--recipe", type=Path, default=None, help="YAML file with the same option names; flags override it")
        return
    parser.add_argument("--set", dest="params", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                        help="a method parameter, e.g. --set scaling=0.5 (repeatable; values are YAML scalars)")
    parser.add_argument("--token", dest="token", default=argparse.SUPPRESS,
                        help="Hub token (default: HF_TOKEN or your saved login). Never printed or written.")
    parser.add_argument("--recipe", type=Path, default=None, help="YAML file with the same option names; flags override it")


def _parse_set(values: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ContMergeError(f"--set {item!r} is not KEY=VALUE (for example --set scaling=0.5).")
        try:
            params[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            params[key.strip()] = raw
    return params


def options_from_args(ns: argparse.Namespace) -> MergeOptions:
    """Recipe values, overridden by the flags given, validated into one MergeOptions."""
    values: dict[str, Any] = load_recipe(ns.recipe) if ns.recipe else {}
    given = {k: v for k, v in vars(ns).items() if k not in ("recipe", "command", "func")}
    if "params" in given:
        given["params"] = {**values.get("params", {}), **_parse_set(given["params"])}
    values.update(given)
    missing = [f"--{k}" for k in ("base", "method", "out") if k not in values]
    if missing:
        raise ContMergeError(f"Missing {', '.join(missing)} (give them as flags or in --recipe).")
    return MergeOptions.create(**values)


def cmd_merge(ns: argparse.Namespace) -> int:
    from .calibration.calibrator import make_calibrator
    from .engine.distributed import end_job
    from .engine.run import Engine
    from .hooks import step_hooks

    options = options_from_args(ns)
    if options.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        if not options.verbose:  # --quiet --verbose: no progress bars, the step reports still
            logging.getLogger("hf_contmerge").setLevel(logging.WARNING)
    try:
        Engine(options, hooks=step_hooks(options), calibrator=make_calibrator(options)).run()
    finally:
        end_job()
    return 0


EVAL_FLAGS = ("eval_data", "eval_kind", "eval_column", "eval_label_column", "eval_choices_column", "eval_samples",
              "eval_batch_size", "eval_max_length", "eval_max_new_tokens", "eval_references", "eval_all",
              "eval_harness", "eval_harness_include", "device", "device_map", "max_memory", "offload_folder", "allow_pickle", "quiet")


def cmd_eval(ns: argparse.Namespace) -> int:
    """Score the steps of an output folder (written by ``merge``, with or without ``--eval``)."""
    from .artifacts import layout
    from .artifacts.state import read_state
    from .evaluation.hook import evaluate_folder

    done = layout.complete_steps(ns.out)
    if not done:
        raise ContMergeError(f"{ns.out} holds no complete hf-contmerge step to evaluate.")
    state = read_state(layout.step_dir(ns.out, done[-1]))
    given = {k: v for k, v in vars(ns).items() if k in EVAL_FLAGS}
    options = MergeOptions.create(base=state.base["source"], stream=[s["source"] for s in state.stream], method=state.method,
                                  params=state.params, out=ns.out, seed=state.options.get("seed", 0), eval=True,
                                  token=getattr(ns, "token", None), **given)
    for record in evaluate_folder(options, ns.from_step):
        s = record.summary
        acc = "–" if s.acc is None else f"{100 * s.acc:.2f}"
        bwt = "–" if s.bwt is None else f"{100 * s.bwt:+.2f}"
        print(f"step {record.step}: ACC {acc}  BWT {bwt}  " + "  ".join(
            f"{t.name}={'–' if v is None else f'{v:.4g}'}" for t, v in zip(record.tasks, record.matrix[-1])))
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    """Every --methods entry over --orders seeded task orders, into --out (see evaluation/compare.py)."""
    from .evaluation.compare import compare

    methods, n_orders, keep = ns.methods, ns.orders, ns.keep_steps
    del ns.methods, ns.orders, ns.keep_steps
    ns.method = methods[0].partition(":")[0]  # each run is validated with its own method; these options are the template
    options = options_from_args(ns)
    result = compare(options, methods, n_orders, options.out, quiet=options.quiet, keep=keep)
    print((Path(options.out) / "compare.md").read_text(), end="")
    return 0 if result["runs"] else 2


def cmd_methods(ns: argparse.Namespace) -> int:
    for m in map(method_class, method_names()):
        tags = [t for t, on in (("experimental", m.experimental), ("interpretation", bool(m.interpretation)),
                                ("needs data", bool(m.calibration))) if on]
        print(f"{m.name}{'  [' + ', '.join(tags) + ']' if tags else ''}")
        print(f"    {m.summary}")
        for pname, f in m.Params.model_fields.items():
            print(f"    --set {pname}={f.default!r:<8} {f.description or ''}")
        if m.interpretation:
            print(f"    interpretation: {m.interpretation}")
        print(f"    reference: {m.reference}")
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    from .sources.preflight import plan_stream
    from .sources.resolve import resolve

    token = ns.token
    base = resolve(ns.base, token=token, allow_pickle=ns.allow_pickle, role="base", lazy=True)
    items = [resolve(s, token=token, allow_pickle=ns.allow_pickle, role="stream item", base=base, lazy=True) for s in ns.stream]
    try:
        print(plan_stream(base, items).report())
    finally:
        for s in (base, *items):
            s.close()
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo.run import run_demo

    logging.getLogger("hf_contmerge").setLevel(logging.WARNING)  # the demo prints its own table, step by step
    run_demo(method=ns.method, out=ns.out, params=_parse_set(ns.set or []), quiet=ns.quiet)
    return 0


class _Parser(argparse.ArgumentParser):
    """A parser whose epilog may be built only when its help is shown (``merge`` lists the methods,
    which imports them and torch)."""

    epilog_factory: typing.Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog is None and self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-contmerge", description="Continual model merging for the Hugging Face stack.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    merge = sub.add_parser("merge", help="merge a stream of fine-tunes, writing OUT/step-1 … OUT/step-T",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.epilog_factory = _methods_help
    _add_option_flags(merge)
    merge.set_defaults(func=cmd_merge)
    evaluate = sub.add_parser("eval", help="score the steps of an output folder on --eval-data tasks (record, card, plots)")
    evaluate.add_argument("out", type=Path, help="an output folder written by `hf-contmerge merge`")
    evaluate.add_argument("--from-step", type=int, default=1, metavar="K", help="evaluate steps K..T only (step K-1 "
                          "must hold a record; default: every step)")
    _add_option_flags(evaluate, only=EVAL_FLAGS)
    evaluate.set_defaults(func=cmd_eval)
    comp = sub.add_parser("compare", help="every --methods entry over --orders seeded task orders, with --eval-data; "
                          "tables of ACC, BWT and normalised ACC (mean ± std) in --out",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.epilog_factory = _methods_help
    comp.add_argument("--methods", nargs="+", required=True, metavar="NAME[:K=V,...]", help="methods to compare, each with "
                      "optional parameters, e.g. opcm magmax ties:k=0.2")
    comp.add_argument("--orders", type=int, default=3, help="task orders: the stream as given, then seeded permutations "
                      "(default: 3)")
    comp.add_argument("--keep-steps", choices=("all", "final"), default="all", help="final: remove a run's earlier steps "
                      "once its final one is complete (its record keeps every step's scores); default: all")
    _add_option_flags(comp, skip=("method", "params", "resume", "resume_from", "push_to", "private", "push_layout",
                                  "revision_prefix", "push_existing", "push_retries"))
    comp.set_defaults(func=cmd_compare)
    sub.add_parser("methods", help="list methods with their parameters and defaults").set_defaults(func=cmd_methods)
    inspect = sub.add_parser("inspect", help="pre-flight report of a base and a stream (headers only; writes nothing)")
    inspect.add_argument("--base", required=True)
    inspect.add_argument("--stream", nargs="+", required=True, metavar="SRC")
    inspect.add_argument("--allow-pickle", action="store_true")
    inspect.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or your saved login)")
    inspect.set_defaults(func=cmd_inspect)
    demo = sub.add_parser("demo", help="build a small real stream offline (MiniLM fine-tunes) and merge it")
    demo.add_argument("--method", default="opcm", choices=method_names())
    demo.add_argument("--set", action="append", metavar="KEY=VALUE")
    demo.add_argument("--out", type=Path, default=None, help="output folder (default: a fresh folder in the cache)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logger = logging.getLogger("hf_contmerge")
    handler = logging.StreamHandler(sys.stderr)  # the stream as it is now (tests capture it)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return ns.func(ns)
    except ContMergeError as e:
        print(f"hf-contmerge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hf-contmerge: interrupted; complete steps are kept, rerun with --resume to finish.", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
