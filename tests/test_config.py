"""params.yaml validation: unknown keys and wrong types name the key; overrides are checked."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from components.config import ConfigError, Params, apply_override, load_params, parse_params


def test_repository_params_file_is_valid():
    params = load_params("params.yaml")
    assert "toy" in params.bases
    assert params.bases["toy"].guidance_scale <= 3


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"distill\.learning_rate: unknown key"):
        load_params(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"distill\.max_steps"):
        load_params(path)


def test_every_violation_listed_at_once():
    with pytest.raises(ConfigError) as err:
        parse_params({"storage": {"rooot": "x"}, "bases": {"b": {"reference": "r", "family": "sd3"}}})
    message = str(err.value)
    assert "storage.rooot" in message and "bases.b.family" in message


def test_override_wins_and_is_validated():
    params = load_params("params.yaml", ["distill.max_steps=7", "storage.root=s3://bucket/prefix"])
    assert params.distill.max_steps == 7
    assert params.storage.root == "s3://bucket/prefix"
    with pytest.raises(ConfigError, match=r"distill\.max_steps"):
        load_params("params.yaml", ["distill.max_steps=seven"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "distill.max_steps")


def test_sections_are_frozen():
    params = Params()
    with pytest.raises(ValidationError, match="frozen"):
        params.distill.max_steps = 3  # type: ignore[misc]


def test_unknown_base_lists_known_names():
    with pytest.raises(ConfigError, match="known: toy"):
        load_params("params.yaml").base("nope")


def test_digest_changes_with_content():
    a = load_params("params.yaml")
    b = load_params("params.yaml", ["distill.lr=0.5"])
    assert a.digest() == load_params("params.yaml").digest()
    assert a.digest() != b.digest()


@pytest.mark.parametrize("override, key", [
    ("distill.batch_size=0", "distill.batch_size"),
    ("distill.max_steps=0", "distill.max_steps"),
    ("distill.checkpoint_every=-1", "distill.checkpoint_every"),
    ("distill.lr=0", "distill.lr"),
    ("distill.sync_every=0", "distill.sync_every"),
])
def test_distill_ranges_are_checked_when_params_load(override: str, key: str) -> None:
    """A zero batch used to fail deep in training ("need at least one array to stack")."""
    with pytest.raises(ConfigError, match=rf"{key}: Input should be greater than"):
        load_params("params.yaml", [override])


@pytest.mark.parametrize("override, message", [
    ("distill.batch_size=0", "distill.batch_size: Input should be greater than or equal to 1"),
    ("distill.checkpoint_every=-1", "distill.checkpoint_every: Input should be greater than or equal to 0"),
    ("distill.lora_dropout=1.5", "distill.lora_dropout: Input should be less than 1"),
    ("distill.adam_beta2=1", "distill.adam_beta2: Input should be less than 1"),
    ("encode.batch_size=0", "encode.batch_size: Input should be greater than or equal to 1"),
    ("encode.shard_size=0", "encode.shard_size: Input should be greater than or equal to 1"),
    ("encode.workers=-1", "encode.workers: Input should be greater than or equal to 0"),
    ("curate.max_watermark=1.5", "curate.max_watermark: Input should be less than or equal to 1"),
    ("curate.max_null_rate=-0.1", "curate.max_null_rate: Input should be greater than or equal to 0"),
    ("curate.max_unreadable_rate=2", "curate.max_unreadable_rate: Input should be less than or equal to 1"),
    ("curate.min_rows=0", "curate.min_rows: Input should be greater than or equal to 1"),
    ("evaluate.steps=[4, 0]", "evaluate.steps.1: Input should be greater than 0"),
    ("evaluate.samples_per_prompt=0", "evaluate.samples_per_prompt: Input should be greater than or equal to 1"),
    ("evaluate.tcd_gamma=1.5", "evaluate.tcd_gamma: Input should be less than or equal to 1"),
    ("merge.lcm_steps=0", "merge.lcm_steps: Input should be greater than or equal to 1"),
    ("merge.weights=[[0.8, -1]]", "merge.weights.0.1: Input should be greater than or equal to 0"),
    ("bases.toy.resolution=0", "bases.toy.resolution: Input should be greater than or equal to 8"),
    ("orchestrate.torch_threads=0", "orchestrate.torch_threads: Input should be greater than or equal to 1"),
    ("storage.retries=0", "storage.retries: Input should be greater than or equal to 1"),
])
def test_nonsense_numbers_fail_at_the_cli_naming_the_key(lcmlora_cli, override: str, message: str) -> None:
    """Zero or negative sizes and rates outside [0, 1] stop `lcmlora` before any stage, naming the key."""
    code, err = lcmlora_cli("distill", "--dry-run", "--set", override)
    assert code == 2, err
    assert f"lcmlora: config error: --set {override!r}: {message}" in err


def test_caption_bounds_must_be_ordered(lcmlora_cli) -> None:
    code, err = lcmlora_cli("curate", "--dry-run", "--set", "curate.caption_min_chars=600")
    assert code == 2
    assert "caption_min_chars (600) is above caption_max_chars (500)" in err


def test_a_bad_value_names_the_file_it_came_from(lcmlora_cli, tmp_path) -> None:
    params = tmp_path / "mine.yaml"
    params.write_text(Path("params.yaml").read_text().replace("  batch_size: 32           # VAE batch",
                                                              "  batch_size: 0            # VAE batch"))
    code, err = lcmlora_cli("encode", "--dry-run", "--params", str(params),
                     "--set", "distill.lr=0.001")  # an unrelated, valid override
    assert code == 2
    assert f"{params}: encode.batch_size: Input should be greater than or equal to 1" in err
    assert "--set" not in err


def test_a_bad_set_value_names_the_set_not_the_file(lcmlora_cli) -> None:
    """It used to say `params.yaml: distill.max_steps: ...` for a value the user typed on the command line."""
    code, err = lcmlora_cli("distill", "--dry-run", "--set", "distill.max_steps=-5")
    assert code == 2
    assert "--set 'distill.max_steps=-5': distill.max_steps: Input should be greater than or equal to 1" in err
    assert "params.yaml" not in err


def test_a_set_that_creates_a_base_is_named_for_its_missing_keys() -> None:
    with pytest.raises(ConfigError, match=r"--set 'bases.mine.reference=x': bases.mine.family: Field required"):
        load_params("params.yaml", ["bases.mine.reference=x"])


def test_settings_read_as_dvc_writes_them(tmp_path) -> None:
    """YAML 1.2 plain scalars, as `dvc exp run -S` rewrites params.yaml: `no` is the string "no"
    (YAML 1.1 made it false: "Input should be 'no', 'fp16' or 'bf16'"); a boolean setting still
    reads yes/no/on/off as booleans, and a base may be named `on`."""
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  mixed_precision: no\n  compile_unet: on\n"
                    "curate:\n  dedup: no\nencode:\n  text_embeddings: yes\n"
                    "bases:\n  on:\n    reference: r\n    family: sd15\n")
    params = load_params(path)
    assert params.distill.mixed_precision == "no" and params.distill.compile_unet is True
    assert params.curate.dedup is False and params.encode.text_embeddings is True
    assert list(params.bases) == ["on"]


@pytest.mark.parametrize("value", ["no", "'no'", '"no"'])
def test_set_mixed_precision_no(value: str) -> None:
    """`--set distill.mixed_precision=no` used to parse as false and fail."""
    assert load_params("params.yaml", [f"distill.mixed_precision={value}"]).distill.mixed_precision == "no"
