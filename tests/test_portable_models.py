"""A model saved or fine-tuned from the packaged ``toyworld`` refers to its components by name, so a copied folder
loads anywhere (issue 20)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import anygpt.core.index as index_module
from anygpt.core.config import PACKAGED_MODELS
from anygpt.core.index import INDEX_FILE, packaged_model_dir, packaged_reference, read_index
from anygpt.core.pipeline import AnyGPTPipeline


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _answer(pipe: AnyGPTPipeline):
    """A greedy, seeded reply with an image (a few denoising steps)."""
    return pipe(
        "draw a red circle", modalities=["image"], seed=3, max_new_tokens=24, num_inference_steps=2, show_progress=False
    )


def test_saved_toyworld_names_packaged_components_and_loads_after_moving(toyworld, tmp_path):
    saved = tmp_path / "saved"
    toyworld.save_pretrained(saved)
    index = json.loads((saved / INDEX_FILE).read_text())
    config = index["config"]
    assert config["encoder"]["checkpoint"] == "packaged:toyworld/encoder/imagebind.safetensors"
    assert config["llm"]["source"] == "packaged:toyworld/llm"
    assert {m: d["source"] for m, d in config["decoders"].items()} == {
        m: f"packaged:toyworld/decoders/{m}" for m in ("image", "video", "audio")
    }
    install = str(packaged_model_dir("toyworld").resolve())
    for text in _strings(index):
        assert not Path(text).is_absolute() and install not in text, text

    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(saved, moved)
    loaded = AnyGPTPipeline.from_pretrained(moved)
    assert loaded.config.llm.source == str(packaged_model_dir("toyworld").resolve() / "llm")
    before, after = _answer(toyworld), _answer(loaded)
    assert after.text == before.text and after.token_ids == before.token_ids
    assert len(before.images) == len(after.images) == 1
    assert np.array_equal(np.asarray(after.images[0]), np.asarray(before.images[0]))
    # saved again from the moved copy: still by name
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / INDEX_FILE).read_text())["config"]
    assert again["llm"]["source"] == "packaged:toyworld/llm"


def test_packaged_references_resolve_against_this_install(toyworld, tmp_path, monkeypatch):
    """Another machine: the same package installed elsewhere (a link to the shipped model under another root)."""
    toyworld.save_pretrained(tmp_path / "saved")
    other_root = tmp_path / "site-packages" / "anygpt"
    link = other_root / PACKAGED_MODELS["toyworld"]
    link.parent.mkdir(parents=True)
    link.symlink_to(packaged_model_dir("toyworld").resolve(), target_is_directory=True)
    monkeypatch.setattr(index_module, "PACKAGE_ROOT", other_root)
    config, _ = read_index(tmp_path / "saved")
    assert config.decoders["image"].source == str(link.resolve() / "decoders" / "image")
    assert Path(config.encoder.checkpoint).is_file()


def test_packaged_reference_leaves_other_sources_alone(tmp_path):
    assert packaged_reference(None) is None
    assert packaged_reference("tiny") == "tiny"
    assert packaged_reference("cvssp/audioldm-l-full") == "cvssp/audioldm-l-full"
    assert packaged_reference(str(tmp_path / "my-decoder")) == str(tmp_path / "my-decoder")
    assert packaged_reference("./llm") == "./llm"
    root = packaged_model_dir("toyworld")
    assert packaged_reference(str(root / "decoders" / "audio")) == "packaged:toyworld/decoders/audio"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("packaged:nosuch/llm", r"decoders.image.source 'packaged:nosuch/llm' is not a packaged component.*toyworld"),
        ("packaged:toyworld", r"is not a packaged component: expected packaged:NAME/PATH"),
        ("packaged:toyworld/../../core", r"points outside the packaged model 'toyworld'"),
        ("packaged:toyworld/decoders/nothing", r"'packaged:toyworld/decoders/nothing' is missing from the packaged"),
    ],
)
def test_bad_packaged_references_are_refused_naming_the_field(toyworld, tmp_path, source, message):
    toyworld.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / INDEX_FILE
    index = json.loads(path.read_text())
    index["config"]["decoders"]["image"]["source"] = source
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message) as err:
        read_index(tmp_path / "saved")
    assert str(path.resolve()) in str(err.value)
