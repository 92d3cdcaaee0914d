"""components/model_card.py: README.md front matter as the registry and the Hub expect it."""

from __future__ import annotations

import pytest

from components.model_card import (
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
    assert front["base_model"] == "data/toy/base" and front["library_name"] == "diffusers"
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
    for key in ("base_model", "library_name", "tags", "recommended.num_inference_steps",
                "recommended.guidance_scale"):
        assert key in message
