"""components/lora/model_card.py: README.md front matter as the registry and the Hub expect it."""

from __future__ import annotations

import pytest

from components.lora.model_card import (
    ModelCardError,
    check_model_card,
    parse_model_card,
    render_model_card,
)


def test_rendered_card_passes_its_own_check() -> None:
    text = render_model_card(base_model="data/toy/base", title="toy-lcm-lora", tags=["lora", "lcm", "lora"],
                             num_inference_steps=4, guidance_scale=1.5, body="\n## Notes\n",
                             extra={"lcm_lora": {"rank": 4}})
    front = check_model_card(text)
    assert "base_model" not in front and "base_model_relation" not in front  # a local path never reaches the card
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert front["tags"] == ["lora", "lcm"]  # duplicates dropped, order kept
    assert front["recommended"] == {"num_inference_steps": 4, "guidance_scale": 1.5, "scheduler": "LCMScheduler"}
    assert front["lcm_lora"] == {"rank": 4}
    _, body = parse_model_card(text)
    assert body.lstrip().startswith("# toy-lcm-lora") and "## Notes" in body
    assert "num_inference_steps=4" in body


@pytest.mark.parametrize("text, message", [
    ("# no front matter\n", "no YAML front matter"),
    ("---\nbase_model: x\n", "not closed"),
    ("---\n- a list\n---\n", "must be a mapping"),
    ("---\nbase_model: [unclosed\n---\n", "not valid YAML"),
])
def test_malformed_cards_fail_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(ModelCardError, match=message):
        check_model_card(text, "lora/README.md")


def test_every_missing_key_is_listed_at_once() -> None:
    text = "---\nlibrary_name: transformers\nrecommended: {num_inference_steps: 0}\n---\nbody\n"
    with pytest.raises(ModelCardError) as err:
        check_model_card(text, "lora/README.md")
    message = str(err.value)
    assert message.startswith("lora/README.md")
    for key in ("library_name", "tags", "recommended.num_inference_steps",
                "recommended.guidance_scale"):
        assert key in message


# --- the Hub's metadata (checked offline: the Hub's validate-yaml endpoint is not reachable here) ---------------

HUB_FIELDS = {  # https://huggingface.co/docs/hub/model-cards#model-card-metadata, plus lcmlora's own keys
    "base_model", "base_model_relation", "library_name", "license", "pipeline_tag", "tags"}


def _hub_round_trip(text: str) -> dict:
    """The front matter as huggingface_hub reads it, rebuilt through ModelCardData with metadata errors raised."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    assert ModelCardData(**data, ignore_metadata_errors=False).to_dict() == data
    return data


def test_adapter_card_has_the_hub_fields_from_params() -> None:
    from huggingface_hub.utils import validate_repo_id

    from components.lora.model_card import HUB_RELATIONS, hub_problems

    text = render_model_card(base_model="/models/my-ft", hub_id="stabilityai/stable-diffusion-xl-base-1.0",
                             license="openrail++", title="sdxl-lcm-lora")
    front = _hub_round_trip(text)
    assert front["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    validate_repo_id(front["base_model"])  # the library's own repo-id rule
    assert front["base_model_relation"] == "adapter" and front["base_model_relation"] in HUB_RELATIONS
    assert front["pipeline_tag"] == "text-to-image" and front["library_name"] == "diffusers"
    assert front["license"] == "openrail++"
    assert HUB_FIELDS <= set(front), set(front)
    assert hub_problems(front) == []
    assert "/models/my-ft" not in text, "the local reference never reaches the card"


def test_merged_variant_is_a_merge_and_a_hub_reference_is_kept() -> None:
    from components.lora.model_card import hub_problems

    front = _hub_round_trip(render_model_card(base_model="runwayml/stable-diffusion-v1-5", title="v",
                                              relation="merge"))
    assert front["base_model"] == "runwayml/stable-diffusion-v1-5" and front["base_model_relation"] == "merge"
    assert "license" not in front and hub_problems(front) == []


def test_hub_problems_name_a_local_base_model_of_an_older_card() -> None:
    from components.lora.model_card import hub_problems

    problems = hub_problems({"base_model": "data/toy/base", "base_model_relation": "fork", "pipeline_tag": None})
    assert [p.split(":")[0] for p in problems] == ["base_model", "base_model_relation", "pipeline_tag"]


def test_base_hub_id_is_validated_in_params() -> None:
    from components.config import ConfigError, parse_params

    base = {"reference": "data/toy/base", "family": "sd15"}
    with pytest.raises(ConfigError, match="bases.toy.hub_id"):
        parse_params({"bases": {"toy": {**base, "hub_id": "/models/my-ft"}}})
    cfg = parse_params({"bases": {"toy": {**base, "hub_id": "org/model", "license": "mit"}}})
    assert cfg.bases["toy"].hub_id == "org/model" and cfg.bases["toy"].license == "mit"
