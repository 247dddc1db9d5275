"""The ``recsys`` command: features, train, evaluate, candidates, or run (all four in order)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from recsys.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3

_OVERRIDES_HELP = "dotted config overrides applied on top of --config, e.g. train.max_epochs=5 model.hidden=32"

_JOBS: dict[str, str] = {
    "features": "read events, validate, filter, encode ids, build sequences and splits (Polars)",
    "train": "train the SASRec model with Lightning; save it and register a new model version",
    "evaluate": "full-catalogue ranking metrics of the model and the popularity baseline",
    "candidates": "top-K candidates per user from the trained model through a FAISS index",
    "run": "features → train → evaluate → candidates, in order",
}

_EPILOG = """exit codes: 0 success, 1 unexpected failure, 2 bad config or arguments, 3 bad input data.
outputs: <work_dir>/{features,model,evaluation,candidates,logs}; MLflow store <work_dir>/mlflow.db by default."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Attention-based sequential recommender pipeline.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in _JOBS.items():
        cmd = sub.add_parser(name, help=text, description=text, epilog=_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_argument("--config", type=Path, default=None,
                         help="YAML config under conf/ (default: built-in defaults, see conf/base.yaml)")
        cmd.add_argument("--quiet", action="store_true", help="only warnings and the final summary")
        cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    return parser


def _setup_logging(cfg: Config, job: str, quiet: bool) -> Path:
    logs = Path(cfg.work_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(fmt)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [console, to_file]
    root.setLevel(logging.INFO)
    for noisy in ("alembic", "mlflow.store", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return log_file


def _job(name: str) -> Callable[[Config], Path]:
    if name == "features":
        from pipelines.build_features import run
    elif name == "train":
        from pipelines.train import run
    elif name == "evaluate":
        from pipelines.evaluate import run
    elif name == "candidates":
        from pipelines.generate_candidates import run
    else:
        from pipelines.run_all import run
    return run


def _summary(cfg: Config) -> str:
    root = Path(cfg.work_dir)
    lines = [f"work directory: {root.resolve()}"]
    report = root / "evaluation" / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        lines.append(f"evaluation ({data['split']} split, full catalogue, seen items excluded):")
        names = [k for k in data if isinstance(data[k], dict)]
        keys = [f"{m}_at_{k}" for k in data["ks"] for m in ("ndcg", "hr", "mrr")] + [f"coverage_at_{data['ks'][0]}"]
        lines.append(f"  {'metric':<16}" + "".join(f"{n:>12}" for n in names))
        for key in keys:
            lines.append(f"  {key:<16}" + "".join(f"{data[n].get(key, float('nan')):>12.4f}" for n in names))
    for name in ("features", "model", "evaluation", "candidates", "logs"):
        if (root / name).exists():
            lines.append(f"  {name + ':':<12} {(root / name).resolve()}")
    if cfg.tracking.enabled:
        from recsys.tracking import tracking_uri

        lines.append(f"  {'mlflow:':<12} {tracking_uri(cfg)} (experiment '{cfg.tracking.experiment}', "
                     f"model '{cfg.tracking.registered_model}')")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"recsys {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log_file = _setup_logging(cfg, args.command, args.quiet)
    from features.readers import InputDataError

    try:
        _job(args.command)(cfg)
    except InputDataError as exc:
        logging.getLogger("recsys").error("bad input: %s", exc)
        print(f"recsys {args.command}: bad input data: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (FileNotFoundError, ConfigError) as exc:
        print(f"recsys {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        logging.getLogger("recsys").exception("recsys %s failed; full log in %s", args.command, log_file)
        return EXIT_FAILED
    print(_summary(cfg))
    print(f"  {'log:':<12} {log_file.resolve()}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
