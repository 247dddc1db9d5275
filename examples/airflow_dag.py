"""Example Airflow DAG for the nightly jobs (an example to copy into your Airflow deployment: Airflow is NOT a
dependency of this project and nothing here imports this file).

Weekly retraining through the promotion gate, nightly candidates from the champion. NIGHT is the date the run
is for: the end of its data interval (`{{ data_interval_end | ds }}`, the day the scheduled run starts on Airflow 2
and 3 alike; Airflow 2's `{{ ds }}` is the START of the interval, yesterday for a daily DAG). Backfills and reruns
are idempotent: a date that already succeeded is a no-op (exit 0), a run that finds the job locked by another one
exits 4 and the task is marked skipped (a skipped `features` skips that night's `candidates` too: it only happens
while the weekly `run`, which writes the same night's candidates, holds the lock).

Every task runs in ROOT (`cwd=`): the config's relative paths (work_dir, data.path, ...) are relative to the
current directory, and a BashOperator otherwise runs in a temporary one that Airflow deletes afterwards.
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.operators.bash import BashOperator

ROOT = "/opt/recsys"  # where the project is checked out: every task runs here
RECSYS = f"{ROOT}/.venv/bin/recsys"  # the venv where the project is installed
CONFIG = f"{ROOT}/conf/prod.yaml"  # your config: data.path, work_dir, tracking.uri, ... (relative to ROOT)
NIGHT = "{{ data_interval_end | ds }}"
EXIT_LOCKED = 4

default_args = {"retries": 2, "retry_delay": dt.timedelta(minutes=10)}

with DAG(
    dag_id="recsys_train_weekly",
    schedule="0 2 * * 0",
    start_date=dt.datetime(2026, 1, 4),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
) as train_dag:
    # features → train → evaluate (promotion gate) → candidates, resumable after a crash.
    BashOperator(
        task_id="run",
        bash_command=f"{RECSYS} run --config {CONFIG} --run-date {NIGHT}",
        cwd=ROOT,
        skip_on_exit_code=EXIT_LOCKED,
    )

with DAG(
    dag_id="recsys_candidates_nightly",
    schedule="0 4 * * *",
    start_date=dt.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
) as candidates_dag:
    features = BashOperator(
        task_id="features",
        bash_command=f"{RECSYS} features --config {CONFIG} --run-date {NIGHT}",  # the input gate's date
        cwd=ROOT,
        skip_on_exit_code=EXIT_LOCKED,
    )
    candidates = BashOperator(
        task_id="candidates",
        bash_command=f"{RECSYS} candidates --config {CONFIG} --model models:/sasrec@champion --date {NIGHT}",
        cwd=ROOT,
        skip_on_exit_code=EXIT_LOCKED,
    )
    features >> candidates
