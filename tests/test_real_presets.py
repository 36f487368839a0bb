"""Real presets: nothing is downloaded; a missing backbone is one clear error naming it and where it was looked for."""

from __future__ import annotations

import pytest

from anygpt import AnyGPTPipeline, cli
from anygpt.base.utils import resolve_local_model
from anygpt.core.config import config_from_preset


@pytest.fixture()
def empty_caches(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("ANYGPT_IMAGEBIND_CHECKPOINT", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_nextgpt_preset_has_nextgpt_numbers():
    config = config_from_preset("nextgpt-7b")
    assert config.llm.source == "lmsys/vicuna-7b-v1.5" and config.llm.lora.r == 32 and config.llm.lora.alpha == 32
    assert config.signal_tokens.counts == {"image": 4, "video": 24, "audio": 8}
    assert {k: v.source for k, v in config.decoders.items()} == {
        "image": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "video": "cerspense/zeroscope_v2_576w",
        "audio": "cvssp/audioldm-l-full",
    }
    assert config.input_projector.name == "linear" and config.output_projector.name == "transformer"


def test_missing_imagebind_checkpoint_names_every_place(empty_caches):
    with pytest.raises(FileNotFoundError) as err:
        AnyGPTPipeline.from_pretrained("nextgpt-7b")
    message = str(err.value)
    assert "imagebind_huge.pth" in message and "ANYGPT_IMAGEBIND_CHECKPOINT" in message
    assert str(empty_caches / "xdg" / "anygpt" / "imagebind_huge.pth") in message


def test_missing_llm_names_the_id_and_the_cache(empty_caches):
    with pytest.raises(FileNotFoundError, match=r"'lmsys/vicuna-7b-v1.5' is neither a local folder nor in the Hugging"):
        resolve_local_model("lmsys/vicuna-7b-v1.5", what="language model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_local_model(str(empty_caches / "no-such-folder"), what="language model")


def test_cli_reports_a_missing_backbone_in_one_line(empty_caches, capsys):
    code = cli.main(["generate", "hi", "--model", "nextgpt-7b", "--out", str(empty_caches / "out")])
    loading, error = capsys.readouterr().err.splitlines()  # the loading line, then the error in one line
    assert code == 2 and loading == "anygpt: loading nextgpt-7b (cpu) ..."
    assert error.startswith("anygpt: error: ") and "imagebind_huge.pth" in error
    assert not (empty_caches / "out").exists()
    # --quiet: the error alone
    code = cli.main(["generate", "hi", "--model", "nextgpt-7b", "--quiet", "--out", str(empty_caches / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("anygpt: error: ") and "imagebind_huge.pth" in err and err.count("\n") == 1
