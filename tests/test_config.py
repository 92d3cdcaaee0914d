"""params.yaml validation: unknown keys and wrong types name the key; overrides are checked."""

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
