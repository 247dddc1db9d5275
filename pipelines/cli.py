"""The ``recsys`` command: features, train, evaluate, candidates, or run (all four in order)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pipelines.schedule import LockedError, ScheduledRun, job_lock, parse_run_date, today_utc, work_dir_lock
from recsys.config import QUIET_VARIABLE, Config, ConfigError, load_config
from recsys.faults import fault_point

if TYPE_CHECKING:
    from recsys.sharding import Shard

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_LOCKED = 4
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM

_OVERRIDES_HELP = "dotted config overrides applied on top of --config, e.g. train.max_epochs=5 model.hidden=32"

_STATUS_HELP = ("where the work directory stands: last successes, features, model, evaluation, candidate "
                "nights and running jobs, read from its files (changes nothing; exit 2 if it does not exist)")

_JOBS: dict[str, str] = {
    "features": "read events, validate, filter, encode ids, build sequences and splits (Polars)",
    "train": "train the SASRec model with Lightning; save it and register a new model version",
    "evaluate": "full-catalogue ranking metrics of the model and its baselines (evaluate.baselines)",
    "candidates": "top-K candidates per user from the trained model through a FAISS index",
    "run": "features → train → evaluate → candidates, in order",
    "prune": "delete MLflow model versions and runs older than tracking.keep_days (never an alias's version, "
             "the latest candidates' or the work directory's model, nor their runs)",
}

_EPILOG = """exit codes: 0 success (or already done for --run-date), 1 unexpected failure, 2 bad config or
arguments, 3 bad input data, 4 locked (the same job is running on this work directory), 143 stopped by SIGTERM
(a scheduler's timeout, a pod eviction: retry it; training resumes from its last checkpoint).
outputs: <work_dir>/{features,model,evaluation,candidates,logs}; MLflow store <work_dir>/mlflow.db by default;
success markers <work_dir>/runs/<job>/<date>.json (run, train); locks <work_dir>/.locks/<job>.lock."""

# Jobs that take --run-date/--force: they record a success marker and skip a date that already succeeded.
_SCHEDULED = ("run", "train")
# Jobs that only read the feature set and the model: they share the work directory lock (the others hold it
# alone), see pipelines.schedule.work_dir_lock.
_READERS = ("evaluate", "candidates", "prune")
# Set by distributed launchers: torchrun (RANK, LOCAL_RANK, GROUP_RANK), SLURM (SLURM_PROCID), Lightning's
# own launcher and a manual multi-node start (LOCAL_RANK, NODE_RANK). Any of them non-zero: not global rank 0.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_PROCID")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors follow RECSYS_LOG_FORMAT: with json, one JSON line on stderr
    (argparse's usage text would be the one non-JSON line a log collector gets); exit 2 either way."""

    def error(self, message: str) -> NoReturn:
        if _json_requested():
            _early_fail(self.prog.split()[-1], f"{self.prog}: {message} (see {self.prog} --help)")
            self.exit(EXIT_USAGE)
        super().error(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        if name in _SCHEDULED:
            cmd.add_argument("--run-date", type=_run_date, default=None, metavar="YYYY-MM-DD",
                             help="the date this run is for (default: today, UTC); a date that already "
                                  "succeeded with the same config is skipped")
            cmd.add_argument("--force", action="store_true",
                             help="run even if this date already succeeded; training starts from scratch")
        if name == "prune":  # not scheduled (no marker): the date anchors tracking.keep_days
            cmd.add_argument("--run-date", type=_run_date, default=None, metavar="YYYY-MM-DD",
                             help="delete what is tracking.keep_days days or more before this date (default: "
                                  "today, UTC)")
            cmd.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
        if name == "features":  # not scheduled (no marker): the date only anchors the input gate
            cmd.add_argument("--run-date", type=_run_date, default=None, metavar="YYYY-MM-DD",
                             help="the date the input gate measures features.max_event_age against (default: "
                                  "today, UTC); pass the scheduler's date when backfilling")
        cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)
        if name == "candidates":
            cmd.add_argument("--model", default=None, metavar="URI",
                             help="model to score with: models:/NAME@ALIAS (e.g. models:/sasrec@champion), "
                                  "models:/NAME/VERSION or a local directory (default: <work_dir>/model); "
                                  "same as candidates.model=URI")
            cmd.add_argument("--date", default=None, type=datetime.date.fromisoformat, metavar="YYYY-MM-DD",
                             help="night to write, the partition candidates/date=YYYY-MM-DD "
                                  "(default: today, UTC); same as candidates.date=YYYY-MM-DD")
            cmd.add_argument("--shard", default=None, type=_shard, metavar="i/N",
                             help="score only the users of shard i of N (0-based; by a hash of user_id) into "
                                  "candidates/shard=i-of-N/date=YYYY-MM-DD/; the N shards are independent "
                                  "jobs and their union is the unsharded night")
    status = sub.add_parser("status", help=_STATUS_HELP, description=_STATUS_HELP)
    status.add_argument("--config", type=Path, default=None, help="YAML config (for work_dir)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--prometheus", type=Path, default=None, metavar="FILE",
                        help="also write the status as Prometheus gauges to FILE (e.g. the node_exporter textfile "
                             "collector's directory/recsys.prom), atomically; needs prometheus_client")
    status.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    return parser


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """``candidates --model/--date`` as config overrides (JSON-quoted: read back verbatim as YAML)."""
    flags = {"candidates.model": getattr(args, "model", None), "candidates.date": getattr(args, "date", None)}
    return [f"{key}={json.dumps(str(value))}" for key, value in flags.items() if value is not None]


def _shard(text: str) -> Shard:
    from recsys.sharding import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lock_name(args: argparse.Namespace) -> str:
    """The job's lock (and log file) name: shards of a night run side by side, so each has its own."""
    shard = getattr(args, "shard", None)
    return args.command if shard is None else f"{args.command}.shard-{shard.index}-of-{shard.count}"


def _is_worker() -> bool:
    """Whether a distributed launcher started this process as anything but global rank 0."""
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in _RANK_VARIABLES)


# A date this far after today (UTC) is a typo, not a night: it would sort as the latest night in `recsys status`
# (its freshness gauge, and the staleness alert on it, frozen until then). One day of slack for a night written
# ahead, or a scheduler in a time zone east of UTC.
MAX_DAYS_AHEAD = 1


def _check_dates(args: argparse.Namespace, cfg: Config) -> None:
    """Raise ConfigError for a --run-date or night (candidates.date, --date) more than MAX_DAYS_AHEAD after
    today (UTC), and for `recsys run` whose candidates.date is not its run date (the run's marker would name
    one date and its night another, replacing a night published before)."""
    latest = today_utc() + datetime.timedelta(days=MAX_DAYS_AHEAD)
    night = cfg.candidates.date if args.command in ("candidates", "run") else None
    for what, day in (("--run-date", getattr(args, "run_date", None)), ("candidates.date (--date)", night)):
        if day is not None and day > latest:
            raise ConfigError(f"{what} {day} is {(day - today_utc()).days} days after today ({today_utc()}, UTC); "
                              "a run or a night is for today or a date before it (a backfill): check the date")
    run_date = getattr(args, "run_date", None) or today_utc()
    if args.command == "run" and night is not None and night != run_date:
        raise ConfigError(f"candidates.date {night} is not the run's date {run_date} (--run-date, default today "
                          "UTC): `recsys run` writes the night of its run date; pass --run-date "
                          f"{night} instead of candidates.date, or run `recsys candidates --date {night}` alone")


def _run_date(text: str) -> datetime.date:
    try:
        return parse_run_date(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log aggregators: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, ``job``, ``pid``, and ``exception`` (the traceback) when there is one."""

    def __init__(self, job: str) -> None:
        super().__init__()
        self.job = job

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(), "job": self.job,
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


_CONSOLE = "to_console"  # a log record's attribute: False keeps it out of stderr (see _fail)


def _json_requested() -> bool:
    """Whether RECSYS_LOG_FORMAT asks for JSON, read without validating it (for failures before or instead of
    :func:`_log_format`, which refuses any other value than text / json)."""
    return os.environ.get("RECSYS_LOG_FORMAT", "").strip().lower() == "json"


def _log_format() -> str:
    """``RECSYS_LOG_FORMAT``: ``text`` (default) or ``json``; raises ConfigError naming it otherwise."""
    value = os.environ.get("RECSYS_LOG_FORMAT", "text").strip().lower() or "text"
    if value not in ("text", "json"):
        raise ConfigError(f"environment variable RECSYS_LOG_FORMAT={value!r}: use 'text' or 'json'")
    return value


def _setup_logging(cfg: Config, job: str, quiet: bool) -> Path:
    logs = Path(cfg.work_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    removed = _remove_old_logs(logs, cfg.log_keep_days)
    log_file = logs / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    json_logs = _log_format() == "json"
    fmt = JsonFormatter(job) if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.addFilter(lambda record: getattr(record, _CONSOLE, True))  # False: for the log file only
    console.setFormatter(fmt)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [console, to_file]
    # Python warnings (a library's deprecation notice) through these handlers: into the log file, and with
    # RECSYS_LOG_FORMAT=json as JSON lines (printed as they were, they broke a collector's one-object-per-line)
    logging.captureWarnings(True)
    root.setLevel(logging.INFO)
    for noisy in ("alembic", "mlflow.store", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if removed:
        logging.getLogger(__name__).info("log_keep_days=%d: removed %d log files of %s last written longer ago "
                                         "(the newest of them: %s)", cfg.log_keep_days, len(removed), logs,
                                         removed[0][0].name)
    return log_file


def _remove_old_logs(logs: Path, keep_days: int | None) -> list[tuple[Path, float]]:
    """Remove the ``*.log`` files of ``logs`` last written more than ``keep_days`` days ago (a running job's
    log is written to as it goes, so it is never that old); returns (file, last written) of each removed,
    newest first. One that cannot be removed (a permission, another job's clean-up first) is left, not an error."""
    if keep_days is None:
        return []
    cutoff = time.time() - keep_days * 86_400
    removed = []
    for path in logs.glob("*.log"):
        try:
            mtime = path.stat().st_mtime
            if mtime < cutoff:
                path.unlink()
                removed.append((path, mtime))
        except OSError:
            continue
    return sorted(removed, key=lambda item: -item[1])


def _job(name: str) -> Callable[..., Path]:
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


def _execute(args: argparse.Namespace, cfg: Config) -> bool:
    """Run the job; for a scheduled job, skip a date already done and write the success marker.

    Returns False when there was nothing to do.
    """
    if args.command == "candidates":
        _job(args.command)(cfg, shard=args.shard)
        return True
    if args.command == "features":
        _job(args.command)(cfg, args.run_date)
        return True
    if args.command == "prune":  # its own summary: it changes nothing of the work directory's outputs
        from pipelines.prune import run as prune

        print(prune(cfg, args.run_date, dry_run=args.dry_run).summary())
        return True
    if args.command not in _SCHEDULED:
        _job(args.command)(cfg)
        return True
    scheduled = ScheduledRun(cfg, args.command, args.run_date or today_utc())
    prior = None if args.force else scheduled.done()
    if prior is not None:
        message = (f"recsys {args.command}: {scheduled.run_date} already succeeded with this config at "
                   f"{prior['finished_at']} (marker {scheduled.marker}); nothing to do, "
                   "--force runs it again")
        logging.getLogger("recsys").info(message)
        print(message)
        return False
    if args.force:
        scheduled.discard_checkpoints()
    # The processes Lightning's launcher starts for train.devices > 1 inherit this: they must use rank 0's date
    # (the checkpoint directory it resumes from), not their own "today" (a run started before midnight).
    before = os.environ.get(RUN_DATE_VARIABLE)
    os.environ[RUN_DATE_VARIABLE] = scheduled.run_date.isoformat()
    try:
        _job(args.command)(cfg, scheduled.run_date)
    finally:
        if before is None:
            os.environ.pop(RUN_DATE_VARIABLE, None)
        else:
            os.environ[RUN_DATE_VARIABLE] = before
    fault_point("before-marker")
    scheduled.mark_done()
    scheduled.prune_checkpoints()
    return True


def _deltas(report: dict, names: list[str]) -> list[str]:
    """Two table rows: the model's paired NDCG@k gain over each baseline (model - baseline, same users) and
    its 95 % normal interval half-width (1.96 s.e.); blank under the model itself."""
    key = f"ndcg_at_{report['ks'][0]}"
    if not any(f"delta_{key}_se" in report[n] for n in names):
        return []

    def cell(name: str, value: str) -> str:
        return f"{report[name][value]:>+12.4f}" if value in report[name] else " " * 12

    gain = f"  {key + ' gain':<16}" + "".join(cell(n, f"delta_{key}") for n in names)
    width = f"  {'± 95 % (paired)':<16}" + "".join(
        f"{1.96 * report[n][f'delta_{key}_se']:>12.4f}" if f"delta_{key}_se" in report[n] else " " * 12
        for n in names)
    return [gain, width]


def _segments(report: dict, names: list[str]) -> list[str]:
    """One row per history-length segment (evaluate.history_segments) and per target event type
    (evaluate.type_segments): each scorer's NDCG@k there, and the segment's user count."""
    key = f"ndcg_at_{report['ks'][0]}"
    rows = []
    for part, title in (("segments", "history length (events before the target)"),
                        ("type_segments", "the target's event type")):
        parts = report["model"].get(part, {})
        rows += [f"  {key} by {title}:"] if parts else []
        for label, segment in parts.items():
            cells = "".join(f"{report[n][part][label].get(key, float('nan')):>12.4f}" for n in names)
            rows.append(f"    {label:<14}" + cells + f"   ({int(segment['n_users'])} users)")
    return rows


def _summary(cfg: Config) -> str:
    root = Path(cfg.work_dir)
    lines = [f"work directory: {root.resolve()}"]
    report = root / "evaluation" / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        seen = "seen items excluded" if data.get("exclude_seen", True) else "seen items competing"
        lines.append(f"evaluation ({data['split']} split, full catalogue, {seen}):")
        names = [k for k in data if isinstance(data[k], dict)]
        keys = [f"{m}_at_{k}" for k in data["ks"] for m in ("ndcg", "hr", "mrr")] + [f"coverage_at_{data['ks'][0]}"]
        lines.append(f"  {'metric':<16}" + "".join(f"{n:>12}" for n in names))
        for key in keys:
            lines.append(f"  {key:<16}" + "".join(f"{data[n].get(key, float('nan')):>12.4f}" for n in names))
        lines.extend(_deltas(data, names))
        lines.extend(_segments(data, names))
    if report.is_file():  # its promotion.json is written with it (one directory)
        from pipelines.status import evaluation_of, stale_warning  # here: it imports torch
        from pipelines.workdir import WorkDir

        evaluation = evaluation_of(WorkDir.of(cfg))
        if evaluation is not None and evaluation["promotion"]:
            lines.append(f"promotion gate: {evaluation['promotion']}")
        if evaluation is not None and evaluation["of_current_model"] is False:
            lines.append(f"STALE: {stale_warning(evaluation)}")
    for name in ("features", "model", "evaluation", "candidates", "logs"):
        if (root / name).exists():
            lines.append(f"  {name + ':':<12} {(root / name).resolve()}")
    if cfg.tracking.enabled:
        from recsys.tracking import tracking_uri

        lines.append(f"  {'mlflow:':<12} {tracking_uri(cfg)} (experiment '{cfg.tracking.experiment}', "
                     f"model '{cfg.tracking.registered_model}')")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with KEY=VALUE overrides anywhere after the command (``status work_dir=X --json
    tracking.enabled=false``: argparse takes one run of positionals and would refuse the second one)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # a word without "=" goes with the overrides: parse_overrides then says what it says of the same word before
    # the options ("override 'foo' is not of the form key.path=value"), not argparse's "unrecognized arguments"
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        _log_format()
        cfg = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    except ConfigError as exc:
        _early_fail(args.command, f"recsys {args.command}: {exc}")
        return EXIT_USAGE
    if args.command == "status":
        if not Path(cfg.work_dir).is_dir():
            _early_fail("status", f"recsys status: work_dir {cfg.work_dir} does not exist; set work_dir= (or "
                        "--config) to the pipeline's work directory")
            return EXIT_USAGE
        from pipelines.status import run as status

        try:
            print(status(cfg, args.json, args.prometheus))
        except (ConfigError, OSError) as exc:
            _early_fail("status", f"recsys status: {exc}")
            return EXIT_USAGE
        return EXIT_OK
    try:
        _check_dates(args, cfg)
    except ConfigError as exc:
        _early_fail(args.command, f"recsys {args.command}: {exc}")
        return EXIT_USAGE
    if _is_worker():
        return _worker(args, cfg)
    try:
        log_file = _setup_logging(cfg, _lock_name(args), args.quiet)
    except OSError as exc:
        _early_fail(args.command, f"recsys {args.command}: work_dir {cfg.work_dir} is not a writable directory "
                    f"({exc}); set work_dir= to a directory path")
        return EXIT_USAGE
    if args.command in (*_SCHEDULED, "features"):  # the jobs that read what ignored() names
        for line in cfg.ignored():
            logging.getLogger("recsys.config").warning("%s", line)
    # --quiet: no progress bar either (recsys.training.quiet_console; inherited by the DDP processes the job
    # starts), for this call only; not a config key, so no hash changes
    quiet_before = os.environ.get(QUIET_VARIABLE)
    os.environ[QUIET_VARIABLE] = "1" if args.quiet else "0"
    try:
        with contextlib.ExitStack() as locks:
            try:  # only taking the locks: an OSError of the job itself is the job's (_guarded)
                locks.enter_context(job_lock(Path(cfg.work_dir), _lock_name(args)))
                locks.enter_context(work_dir_lock(Path(cfg.work_dir), args.command,
                                                  shared=args.command in _READERS))
            except LockedError as exc:
                _fail(f"recsys {args.command}: {exc}")
                return EXIT_LOCKED
            except OSError as exc:  # the lock files: another user's, a read-only .locks/, a full disk
                if _storage_full(exc):
                    _fail(f"recsys {args.command}: the disk or quota is full ({exc}); free space and rerun: "
                          "nothing ran")
                    return EXIT_FAILED
                _fail(f"recsys {args.command}: cannot open the lock files under {Path(cfg.work_dir) / '.locks'} "
                      f"({exc}); are they owned by another user (a run by hand under another account)? Fix their "
                      "owner or mode, or remove them while no job runs")
                return EXIT_USAGE
            if args.command in _READERS:  # no writer can be running: put back what a killed one left half-swapped
                _restore_outputs(Path(cfg.work_dir))
            return _guarded(args, cfg, log_file)
    finally:
        if quiet_before is None:
            os.environ.pop(QUIET_VARIABLE, None)
        else:
            os.environ[QUIET_VARIABLE] = quiet_before


def _storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk, quota or file-size limit: an OSError with that errno,
    or a Polars error carrying the OS's message."""
    import errno

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if any(text in str(exc) for text in ("No space left on device", "Disk quota exceeded", "File too large")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _restore_outputs(work_dir: Path) -> None:
    """A writer killed between the two renames of an output directory (recsys.storage.atomic_dir) leaves
    ``.model.old-…`` and no ``model/``: writers put it back when they next start, but a reading job (evaluate,
    candidates) running before any writer found no model. Under the shared lock no writer is running, so the
    leftovers of the writers' outputs (model/, features/) are certainly dead, on any host: cleared here too
    (another reader doing the same at once is harmless). A reader's own outputs (evaluation/, a night) are left
    to that job: another reader may be writing them right now, in a process this one cannot see."""
    from recsys.storage import remove_stale_temps

    for entry in remove_stale_temps(work_dir, exclusive=True, only=("model", "features")):
        logging.getLogger("recsys").warning("restored or cleared %s, left by a job killed while it replaced an "
                                            "output", entry)


def _early_fail(job: str, text: str) -> None:
    """A failure before the job's logging is set up: plain text on stderr, or with RECSYS_LOG_FORMAT=json one
    JSON line as every other stderr line then is (a value other than text/json is itself this failure)."""
    if _json_requested():
        record = logging.LogRecord("recsys", logging.ERROR, __file__, 0, text, None, None)
        print(JsonFormatter(job).format(record), file=sys.stderr)
    else:
        print(text, file=sys.stderr)


# Rank 0's run date, handed to the DDP processes its launcher starts on the node (see _execute and _worker).
RUN_DATE_VARIABLE = "RECSYS_RUN_DATE"


def _worker(args: argparse.Namespace, cfg: Config) -> int:
    """A DDP process other than global rank 0 (see README "Scale-out"): it trains its share, and takes no lock
    and writes no model, marker or MLflow run; a date rank 0 skips as done is skipped here too."""
    ranks = " ".join(f"{name}={os.environ[name]}" for name in _RANK_VARIABLES if name in os.environ)
    if args.command not in _SCHEDULED:
        print(f"recsys {args.command}: started as a distributed process other than rank 0 ({ranks}); only "
              "`recsys train` (and `recsys run`'s training) run on several processes", file=sys.stderr)
        return EXIT_USAGE
    log_file = _setup_logging(cfg, f"{args.command}-worker-{os.getpid()}", quiet=True)
    inherited = os.environ.get(RUN_DATE_VARIABLE)
    run_date = args.run_date or (parse_run_date(inherited) if inherited else today_utc())
    if not args.force and ScheduledRun(cfg, args.command, run_date).done() is not None:
        return EXIT_OK
    from pipelines import train_worker

    try:
        train_worker.run(cfg, run_date, allow_resume=not args.force)
    except SystemExit as exc:
        return _terminated(args, exc)
    except Exception:
        logging.getLogger("recsys").exception("recsys %s worker (%s) failed; full log in %s", args.command,
                                              ranks, log_file)
        return EXIT_FAILED
    return EXIT_OK


def _terminated(args: argparse.Namespace, exc: SystemExit) -> int:
    """Exit status of a job stopped by SIGTERM during training; any other ``SystemExit`` goes on up.

    Lightning turns SIGTERM into ``SIGTERMException``, a ``SystemExit`` without a code, which Python would
    report as status 0: a scheduler would take the stopped job for a success.
    """
    lightning = sys.modules.get("pytorch_lightning.utilities.exceptions")
    if lightning is None or not isinstance(exc, lightning.SIGTERMException):
        raise exc
    logging.getLogger("recsys").error(
        "recsys %s stopped by SIGTERM before it finished: nothing was marked done; run the same command "
        "again to resume from the last checkpoint", args.command,
    )
    return EXIT_TERMINATED


def _fail(text: str) -> None:
    """Log the failure (to the log file; to stderr too with RECSYS_LOG_FORMAT=json, which then stays pure
    JSON), and in text mode print it on stderr in plain words, once."""
    plain = _log_format() != "json"
    logging.getLogger("recsys").error(text, extra={_CONSOLE: not plain})
    if plain:
        print(text, file=sys.stderr)


def _guarded(args: argparse.Namespace, cfg: Config, log_file: Path) -> int:
    """Run the job and map its failure to an exit code; prints the summary on success."""
    from features.readers import InputDataError
    from recsys.drift import DriftError
    from recsys.sharding import ShardLayoutError
    from recsys.storage import DamagedFileError
    from recsys.tracking import TrackingUnavailableError

    try:
        ran = _execute(args, cfg)
    except InputDataError as exc:
        _fail(f"recsys {args.command}: bad input data: {exc}")
        return EXIT_INPUT
    except (FileNotFoundError, ConfigError, ShardLayoutError, DamagedFileError) as exc:
        _fail(f"recsys {args.command}: {exc}")
        return EXIT_USAGE
    except (TrackingUnavailableError, DriftError) as exc:
        # Operational failures whose message says it all: no traceback for the operator.
        logging.getLogger("recsys").error("recsys %s failed: %s", args.command, exc)
        return EXIT_FAILED
    except SystemExit as exc:
        return _terminated(args, exc)
    except Exception as exc:
        from recsys.tracking import damaged_store, tracking_uri

        store = damaged_store(exc, tracking_uri(cfg) if cfg.tracking.enabled else None)
        if store is not None:  # a damaged page MLflow came upon mid-job (the start checks only the schema)
            _fail(f"recsys {args.command}: {store}")
            return EXIT_USAGE
        if _storage_full(exc):  # the operator's fix is space, not code: one line, no traceback
            logging.getLogger("recsys").error(
                "recsys %s failed: the disk or quota is full (%s); free space (or raise the limit) and rerun: outputs "
                "are published whole or not at all, so the previous ones are intact", args.command,
                str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__)
            return EXIT_FAILED
        logging.getLogger("recsys").exception("recsys %s failed; full log in %s", args.command, log_file)
        return EXIT_FAILED
    if ran and args.command != "prune":
        print(_summary(cfg))
    print(f"  {'log:':<12} {log_file.resolve()}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
