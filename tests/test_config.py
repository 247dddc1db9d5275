"""Config: defaults equal conf/base.yaml, unknown keys and wrong types rejected with the key path."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from recsys.config import Config, ConfigError, load_config, parse_overrides, read_yaml, save_config

CONF = Path(__file__).resolve().parent.parent / "conf"


def test_base_yaml_equals_defaults():
    assert load_config(CONF / "base.yaml") == Config()


def _key_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, field in model.model_fields.items():
        paths.add(prefix + name)
        # a section that defaults to null (data.item_features) is one key here; its own keys come with it
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths |= _key_paths(field.annotation, f"{prefix}{name}.")
    return paths


def _yaml_paths(mapping: dict, prefix: str = "") -> set[str]:
    paths = set()
    for name, value in mapping.items():
        paths.add(prefix + name)
        if isinstance(value, dict):
            paths |= _yaml_paths(value, f"{prefix}{name}.")
    return paths


def test_base_yaml_lists_every_key():
    """base.yaml is the reference of every key: one left out would load (as its default) but be undocumented."""
    listed = _yaml_paths(read_yaml(CONF / "base.yaml"))
    listed = {p for p in listed if not p.startswith("train.type_weights.")}  # a mapping, not sub-keys
    assert sorted(_key_paths(Config) - listed) == []


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_demo_extends_base():
    cfg = load_config(CONF / "demo.yaml")
    assert cfg.data.source == "synthetic"
    assert cfg.train.lr == Config().train.lr  # inherited from base.yaml


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-3", "model.hidden=32", "evaluate.ks=[5, 10]"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.hidden == 32
    assert cfg.evaluate.ks == (5, 10)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.lrr=0.1"], "train.lrr: unknown key"),
        (["model.hidden=abc"], "model.hidden"),
        (["train.max_epochs=1.5"], "train.max_epochs"),
        (["train.loss=hinge"], "train.loss"),
        (["nosection.x=1"], "nosection: unknown key"),
        (["model.hidden=30", "model.n_heads=4"], "divisible"),
        (["features.split=time"], "val_cutoff"),
        (["train.lr=-1"], "train.lr"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("train:\n  batch_sizee: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml[\s\S]*train.batch_sizee"):
        load_config(bad)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["no_equals_sign"])


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(ValidationError):
        cfg.train.lr = 0.5  # type: ignore[misc]


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.hidden=48", "model.n_heads=2"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert read_yaml(tmp_path / "c.yaml")["model"]["hidden"] == 48


@pytest.mark.parametrize("overrides", [
    ["data.format=pairs"], ["data.format=sequence_lines"], ["data.format=csv", "data.timestamp_col=null"],
])
def test_an_event_age_limit_needs_times_not_line_numbers(overrides):
    with pytest.raises(ConfigError, match=r"features\.max_event_age .* gives line numbers, not times"):
        load_config(None, ["features.max_event_age=86400", *overrides])
    with pytest.raises(ConfigError, match=r"features\.max_history_age .* gives line numbers, not times"):
        load_config(None, ["features.max_history_age=86400", *overrides])
    load_config(None, ["features.max_event_age=86400", "data.format=csv"])  # a timestamp column: fine


def _float_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every float key of the config (float or float | None), found from the models so a new one is covered."""
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _float_keys(field.annotation, f"{prefix}{name}.")
        elif field.annotation in (float, float | None):
            keys.append(prefix + name)
    return keys


def test_the_float_keys_are_found():
    assert {"train.lr", "train.max_time_s", "tracking.promotion_tolerance", "evaluate.ease_lambda"} <= set(
        _float_keys(Config))


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", _float_keys(Config))
def test_non_finite_floats_are_refused(key, value):
    """YAML reads .inf / .nan as floats; train.max_time_s=.inf used to pass and crash training's timer."""
    with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_non_finite_type_weights_are_refused():
    with pytest.raises(ConfigError, match=r"train\.type_weights\.buy: Input should be a finite number"):
        load_config(None, ["train.type_weights={buy: .inf}"])


@pytest.mark.parametrize("ks", ["[]", "[0]", "[-5, 10]", "[10, 20, 10]"])
def test_evaluate_ks_must_be_distinct_cutoffs_of_at_least_one(ks):
    """They used to pass and crash the metrics after training (IndexError / RuntimeError)."""
    with pytest.raises(ConfigError, match=r"evaluate\.ks must list at least one cutoff K, each K >= 1 and none twice"):
        load_config(None, [f"evaluate.ks={ks}"])
    assert load_config(None, ["evaluate.ks=[1, 5]"]).evaluate.ks == (1, 5)


@pytest.mark.parametrize("cutoffs", [
    ["features.val_cutoff=100"], ["features.test_cutoff=50"], ["features.val_cutoff=100", "features.test_cutoff=50"],
])
def test_cutoffs_are_refused_without_the_time_split(cutoffs):
    """leave_one_out ignores the cutoffs: they used to pass silently, unordered ones too."""
    with pytest.raises(ConfigError, match=r"features\.val_cutoff and features\.test_cutoff apply to "
                                          r"features\.split=time only .* set features\.split=time or both cutoffs"):
        load_config(None, cutoffs)
    with pytest.raises(ConfigError, match=r"features\.val_cutoff \(100\) must not be after features\.test_cutoff"):
        load_config(None, ["features.split=time", "features.val_cutoff=100", "features.test_cutoff=50"])
    cfg = load_config(None, ["features.split=time", "features.val_cutoff=50", "features.test_cutoff=50"])
    assert (cfg.features.val_cutoff, cfg.features.test_cutoff) == (50, 50)


def test_item_drop_needs_causal_attention():
    """Used to pass the config and fail in SASRecSystem after the features were read (exit 1, not 2)."""
    with pytest.raises(ConfigError, match=r"train\.item_drop applies to causal attention only \(model\.attention is "
                                          r"'bidirectional'.*set train\.item_drop=0 or model\.attention=causal"):
        load_config(None, ["train.item_drop=0.3", "model.attention=bidirectional"])
    load_config(None, ["train.item_drop=0.3"])
    load_config(None, ["train.item_drop=0", "model.attention=bidirectional"])


@pytest.mark.parametrize("warmup", ["5", "6.5"])
def test_warmup_must_end_before_the_last_epoch(warmup):
    """A warm-up of max_epochs or more used to pass: the rate never reached train.lr and cosine never decayed."""
    with pytest.raises(ConfigError, match=rf"train\.warmup_epochs \({warmup}\) must be below train\.max_epochs "
                                          r"\(5\).*lower warmup_epochs or raise max_epochs"):
        load_config(None, ["train.max_epochs=5", f"train.warmup_epochs={warmup}"])
    assert load_config(None, ["train.max_epochs=5", "train.warmup_epochs=4.5"]).train.warmup_epochs == 4.5
    assert load_config(None, ["train.max_epochs=1"]).train.warmup_epochs == 0


@pytest.mark.parametrize("overrides, needle", [
    (["data.item_col=user_id"], "data.user_col and data.item_col both name the column 'user_id'"),
    (["data.event_type_col=item_id"], "data.item_col and data.event_type_col both name the column 'item_id'"),
    (["data.format=parquet", "data.weight_col=timestamp"], "data.timestamp_col and data.weight_col"),
])
def test_one_file_column_fills_one_role(overrides, needle):
    """A typo such as data.item_col=user_id used to build every user's sequence of itself, silently."""
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides)
    load_config(overrides=["data.format=movielens_dat", "data.item_col=user_id"])  # fields named by the format


def test_options_their_mode_never_reads_are_named():
    """train.mask_prob with causal attention (and the like) used to be taken silently: the user believed it
    changed the run. They stay accepted (switching a mode is one edit) and are listed for a warning."""
    assert load_config(None, []).ignored() == []
    cfg = load_config(None, ["train.mask_prob=0.4", "train.n_negatives=64", "train.gbce_t=0.5",
                             "train.compile_mode=reduce-overhead", "train.init_shrink=0.5", "train.init_perturb=0.1"])
    assert cfg.ignored() == [
        "train.mask_prob=0.4 has no effect with model.attention=causal (masking is bidirectional training's)",
        "train.n_negatives=64 has no effect with train.loss=ce (full softmax: every item is a negative)",
        "train.gbce_t=0.5 has no effect with train.loss=ce",
        "train.compile_mode='reduce-overhead' has no effect with train.compile=false",
        "train.init_shrink=0.5 has no effect with train.init_from=null (no warm start)",
        "train.init_perturb=0.1 has no effect with train.init_from=null (no warm start)",
    ]
    # the modes that read them: nothing to say
    used = load_config(None, ["model.attention=bidirectional", "train.mask_prob=0.4", "train.loss=gbce",
                              "train.n_negatives=64", "train.gbce_t=0.5", "train.compile=true",
                              "train.compile_mode=reduce-overhead", "train.init_from=models:/sasrec@champion",
                              "train.init_shrink=0.5", "train.init_perturb=0.1"])
    assert used.ignored() == []


def test_column_keys_a_format_with_its_own_fields_never_reads_are_named():
    """data.event_type_col=rating with data.format=movielens_csv was taken silently (then features.event_types
    said 'set data.event_type_col', which was set)."""
    cfg = load_config(None, ["data.format=movielens_csv", "data.event_type_col=rating", "data.user_col=userId"])
    assert cfg.ignored() == [
        "data.user_col='userId' has no effect with data.format=movielens_csv (it names its own fields; "
        "data.format=csv reads named columns)",
        "data.event_type_col='rating' has no effect with data.format=movielens_csv (it names its own fields; "
        "data.format=csv reads named columns)",
    ]
    assert load_config(None, ["data.format=csv", "data.event_type_col=rating"]).ignored() == []


def test_yaml_merge_keys_load_as_yaml_means(tmp_path):
    """The duplicate-key check refused `<<: *anchor` ("no constructor for the tag ...merge"), valid YAML that
    safe_load reads; a key next to the merge overrides the merged one, and is no duplicate."""
    path = tmp_path / "team.yaml"
    path.write_text("evaluate: &scoring {device: cpu, batch_size: 512}\n"
                    "candidates: {<<: *scoring, batch_size: 256, k: 50}\n", encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.candidates.device, cfg.candidates.batch_size, cfg.candidates.k) == ("cpu", 256, 50)
    assert cfg.evaluate.batch_size == 512


@pytest.mark.parametrize(("override", "value"), [
    ("train.max_epochs=010", 10),  # YAML 1.1 (PyYAML): octal 8
    ("candidates.keep_days=08", 8),
    ("train.lr=1_000.5", 1000.5),
    ("model.hidden=0x20", 32),
])
def test_numbers_are_read_as_written_not_as_yaml_1_1_octal(override, value) -> None:
    key, _ = override.split("=")
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == value


@pytest.mark.parametrize("override", ["train.max_time_s=1:00:00", "train.max_time_s=60:00",
                                      "candidates.active_window=30:00:00:00"])
def test_colon_numbers_are_text_that_a_number_key_refuses_naming_it(override) -> None:
    """YAML 1.1 reads 1:00:00 as base 60 (3600) without a word."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: Input should be a valid (number|integer)"):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["candidates.date=20240501", "candidates.date=1714521600",
                                      "candidates.date='1714521600'"])
def test_a_number_is_no_candidates_date(override) -> None:
    """1714521600 was taken for epoch seconds (2024-05-01); 20240501 gave an error about datetimes."""
    with pytest.raises(ConfigError, match=r"candidates.date: .* is a number; write the night's date as YYYY-MM-DD"):
        load_config(None, [override])
    assert str(load_config(None, ["candidates.date=2024-05-01"]).candidates.date) == "2024-05-01"


def test_a_config_file_reads_numbers_as_yaml_1_2_too(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_epochs: 010\n  max_time_s: 1:00:00\n")
    with pytest.raises(ConfigError, match=r"train.max_time_s"):
        load_config(path, [])
    path.write_text("train:\n  max_epochs: 010\n")
    assert load_config(path, []).train.max_epochs == 10


def test_a_mapping_key_is_replaced_whole_by_a_child_file_and_cleared_by_an_override(tmp_path) -> None:
    """Mappings merged key by key everywhere: `train.type_weights={}` (what the loss=bce error advises) and a child
    file's `type_weights: {}` left the parent's weights in place; dotted overrides still set one weight."""
    (tmp_path / "parent.yaml").write_text("train:\n  type_weights: {purchase: 3.0, view: 0.5}\n  lr: 0.01\n")
    (tmp_path / "clear.yaml").write_text("extends: parent.yaml\ntrain:\n  type_weights: {}\n")
    (tmp_path / "own.yaml").write_text("extends: parent.yaml\ntrain:\n  type_weights: {purchase: 1}\n")
    assert load_config(tmp_path / "clear.yaml").train.type_weights == {}
    assert load_config(tmp_path / "clear.yaml").train.lr == 0.01  # sections still merge key by key
    assert load_config(tmp_path / "own.yaml").train.type_weights == {"purchase": 1.0}
    parent = tmp_path / "parent.yaml"
    assert load_config(parent, ["train.type_weights={}"]).train.type_weights == {}
    assert load_config(parent, ["train.type_weights.purchase=1"]).train.type_weights == {"purchase": 1.0, "view": 0.5}
    assert load_config(parent, ["train.type_weights={buy: 2}"]).train.type_weights == {"buy": 2.0}
    # an optional section set to null in the file is filled by a dotted override
    (tmp_path / "none.yaml").write_text("data:\n  item_features: null\n")
    got = load_config(tmp_path / "none.yaml", ["data.item_features.path=items.csv", "data.item_features.columns=[c]"])
    assert got.data.item_features.path == "items.csv"


@pytest.mark.parametrize("key, raw", [("data.separator", "|"), ("data.separator", ">"), ("data.separator", "\t"),
                                      ("data.separator", "-"), ("data.separator", "?"),
                                      ("data.quote_char", "!"), ("tracking.experiment", "recsys-prod #2"),
                                      ("tracking.experiment", "#nightly"), ("tracking.experiment", "run#1 #nightly"),
                                      ("tracking.experiment", "- a")])
def test_a_shell_argument_is_its_text_where_yaml_syntax_would_swallow_it(key, raw) -> None:
    """`data.separator=|` read as YAML's block scalar "" (refused as empty), a TAB as null, `quote_char=!` as a tag
    (null: quoting silently off), and ` #2` as a comment (`recsys-prod #2` became `recsys-prod`)."""
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [f"{key}={raw}"]), section), name) == raw
    for null in ("null", "~", "!!null"):  # YAML's nulls still are
        assert load_config(None, [f"data.quote_char={null}"]).data.quote_char is None
    assert load_config(None, ["tracking.experiment='a #b'"]).tracking.experiment == "a #b"
    assert load_config(None, ["evaluate.ks=[5, 10]"]).evaluate.ks == (5, 10)


def test_an_error_in_an_override_names_the_overrides_not_only_the_file() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONF / "demo.yaml", ["train.lr=abc", "model.hidden=32"])
    assert "demo.yaml + the command-line overrides (train.lr, model.hidden)" in str(err.value)
    with pytest.raises(ConfigError, match="from the command-line overrides \\(train.lr\\)"):
        load_config(None, ["train.lr=abc"])


def test_a_home_directory_path_is_expanded_as_a_shell_would(monkeypatch, tmp_path) -> None:
    """`work_dir: ~/x` made `./~/x/logs` in the current directory (Python keeps `~`) and then failed reading
    `/root/x/input` (Polars expands it); `data.path=~/events.csv` "did not exist"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["work_dir=~/work", "data.path=~/events.csv", "candidates.allowed_items=~/stock.csv",
                             "train.init_from=~/old-model", "candidates.model=models:/sasrec@champion"])
    assert (cfg.work_dir, cfg.data.path) == (str(tmp_path / "work"), str(tmp_path / "events.csv"))
    assert (cfg.candidates.allowed_items, cfg.train.init_from) == (str(tmp_path / "stock.csv"),
                                                                 str(tmp_path / "old-model"))
    assert cfg.candidates.model == "models:/sasrec@champion" and load_config(None, ["work_dir=a~b"]).work_dir == "a~b"


def test_a_section_given_as_one_mapping_override_merges_into_the_files_section(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("data:\n  synthetic:\n    n_users: 50\n    n_items: 40\n")
    got = load_config(tmp_path / "c.yaml", ["data.synthetic={n_users: 70}"]).data.synthetic
    assert (got.n_users, got.n_items) == (70, 40)


def test_recsys_features_logs_the_keys_its_format_never_reads(tmp_path):
    """The data.*_col warnings are for the features job: it logs them, as train and run log theirs."""
    from pipelines.cli import EXIT_OK, main

    events = tmp_path / "pairs.txt"
    events.write_text("".join(f"{u} {i}\n" for u in range(1, 6) for i in range(1, 5)))
    assert main(["features", "--quiet", f"work_dir={tmp_path / 'work'}", f"data.path={events}",
                 "data.format=pairs", "data.event_type_col=kind"]) == EXIT_OK
    (log,) = (tmp_path / "work" / "logs").glob("features-*.log")
    assert "data.event_type_col='kind' has no effect with data.format=pairs" in log.read_text()
