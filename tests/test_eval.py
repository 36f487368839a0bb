"""``anygpt eval``: metric values against the libraries' own, data readers, feature networks, runs and resume,
the toy-world task (an entry point of the toy world), and the lmms-eval model plugin.

Feature networks are small random ones built here and saved where the harness looks for real ones (a CLIP folder,
a CLAP folder, an Inception weights file): they check the plumbing, not the numbers a real network gives.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from anygpt.apps.evaluation import metrics as M
from anygpt.apps.evaluation.data import detect_format, read_data
from anygpt.apps.evaluation.networks import NETWORKS, FeatureNetworks
from anygpt.apps.evaluation.report import write_contact_sheet
from anygpt.apps.evaluation.runner import read_predictions, run_evaluation
from anygpt.apps.evaluation.tasks import BUILTIN_TASKS, EvalContext, get_task, task_names
from anygpt.apps.evaluation.vqa import normalize_answer, vqa_accuracy
from anygpt.base.errors import DatasetError, UsageError
from anygpt.base.media import Audio, Video
from anygpt.base.modality import Modality

REPO = Path(__file__).resolve().parents[1]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO caption toolkit needs Java")


# ------------------------------------------------------------------------------------------------------------
# tiny feature networks, saved as the real ones are found
# ------------------------------------------------------------------------------------------------------------


def build_tiny_clip(folder: Path) -> Path:
    """A random 1-layer CLIP (real CLIP tokenizer, 32 px images) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from decoders.clip_tokenizer import build_clip_tokenizer

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=build_clip_tokenizer(),
    )
    processor.save_pretrained(folder)
    return folder


def build_tiny_clap(folder: Path) -> Path:
    """A random CLAP (HTSAT audio tower of 2 small stages, 2 s at 48 kHz; CLIP tokenizer) saved to ``folder``."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    from decoders.clip_tokenizer import build_clip_tokenizer

    config = ClapConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=80, pad_token_id=1),
        audio_config=dict(spec_size=256, patch_size=8, patch_stride=[8, 8], window_size=8, depths=[1, 1],
                          num_attention_heads=[2, 2], hidden_size=32, patch_embeds_hidden_size=16, num_mel_bins=64,
                          enable_fusion=False, projection_hidden_size=32),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(folder)
    ClapFeatureExtractor(
        feature_size=64, sampling_rate=48000, max_length_s=2, hop_length=480, fft_window_size=1024,
        truncation="rand_trunc", padding="repeatpad",
    ).save_pretrained(folder)  # fmt: skip
    build_clip_tokenizer().save_pretrained(folder)
    return folder


def build_random_inception(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved as its weights file is (a state dict)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    torch.manual_seed(0)
    with (
        mock.patch.object(fidelity, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)
    return path


class _TinyI3D(torch.nn.Module):
    """Called as StyleGAN-V's TorchScript I3D is: (N, 3, T, H, W) in [-1, 1] -> (N, 8) features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True, return_features: bool = True):
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


def build_tiny_i3d(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_TinyI3D()), str(path))
    return path


@pytest.fixture(scope="module")
def networks_dir(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("networks")
    return {
        "clip": build_tiny_clip(folder / "clip"),
        "clap": build_tiny_clap(folder / "clap"),
        "i3d": build_tiny_i3d(folder / "i3d.pt"),
    }


class _SmallConvFeatures(torch.nn.Module):
    """A small random image feature network for torchmetrics' ``feature=`` (uint8 (B, 3, H, W) in)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(images.float() / 255)).mean(dim=(2, 3))


class _InDouble(torch.nn.Module):
    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images).double()


def _images(count: int, seed: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


# ------------------------------------------------------------------------------------------------------------
# metric values
# ------------------------------------------------------------------------------------------------------------


def test_frechet_distance_is_zero_for_identical_sets_and_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + 2.0  # same covariance, means 2 apart in each of 6 dimensions: distance 6 * 2^2
    assert M.frechet_distance(a, shifted) == pytest.approx(24.0, rel=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        M.frechet_distance(a[:1], a)


def test_fid_and_kid_on_our_features_equal_torchmetrics_on_the_images():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    network = _SmallConvFeatures().eval()
    real, fake = _images(12, 0), _images(12, 1)
    ours = M.fid_kid(M.image_features(real, network, batch_size=5), M.image_features(fake, network), seed=3)
    as_batch = [torch.stack([M._uint8_chw(i) for i in images]) for images in (real, fake)]
    fid = FrechetInceptionDistance(feature=network).double()
    kid = KernelInceptionDistance(feature=_InDouble(network), subsets=100, subset_size=12)  # ours are float64
    for metric in (fid, kid):
        metric.update(as_batch[0], real=True)
        metric.update(as_batch[1], real=False)
    torch.manual_seed(3)
    kid_mean, kid_std = kid.compute()
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert ours["kid"] == pytest.approx(float(kid_mean), rel=1e-5)
    assert ours["kid_std"] == pytest.approx(float(kid_std), rel=1e-5)
    same = M.fid_kid(M.image_features(real, network), M.image_features(real, network), seed=0)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)


def test_inception_weights_load_from_a_local_file_and_match_torchmetrics(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    weights = build_random_inception(tmp_path / "inception.pth")
    networks = FeatureNetworks({"inception": str(weights)})
    real, fake = _images(3, 0, 64), _images(3, 1, 64)
    ours = M.frechet_distance(
        M.image_features(real, networks.inception()), M.image_features(fake, networks.inception())
    )
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights)).double()
    reference.update(torch.stack([M._uint8_chw(i) for i in real]), real=True)
    reference.update(torch.stack([M._uint8_chw(i) for i in fake]), real=False)
    assert ours == pytest.approx(float(reference.compute()), rel=1e-5)
    assert networks.describe() == {"inception": str(weights)}


def test_a_weights_file_holding_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"layer": torch.zeros(1), "payload": mock.sentinel}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="only tensors"):
        FeatureNetworks({"inception": str(path)}).inception()


def test_clip_score_and_clipsim_are_the_clip_cosines(networks_dir):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = (
        CLIPModel.from_pretrained(networks_dir["clip"]),
        CLIPProcessor.from_pretrained(networks_dir["clip"]),
    )
    images, texts = _images(3, 2, 40), ["a red circle", "a blue square", "a dog"]
    scores = M.clip_scores(images, texts, model, processor)
    with torch.no_grad():
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        out = model(**inputs)
    cosines = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalised by CLIPModel
    assert scores["per_sample"] == pytest.approx((100 * cosines.clamp(min=0)).tolist(), abs=1e-3)
    assert scores["clip_score"] == pytest.approx(max(float(100 * cosines.mean()), 0.0), abs=1e-3)
    frames = np.stack([np.asarray(i) for i in images])
    sim = M.clipsim_scores([Video(frames, 8.0)], ["a red circle"], model, processor)
    with torch.no_grad():
        text = model(**processor(text=["a red circle"] * 3, images=images, return_tensors="pt", padding=True))
    expected = float((text.image_embeds * text.text_embeds).sum(-1).mean())
    assert sim["clipsim"] == pytest.approx(max(expected, 0.0), abs=1e-5)


def test_clap_embeddings_fad_and_clap_score(networks_dir):
    networks = FeatureNetworks({"clap": str(networks_dir["clap"])})
    model, extractor, tokenizer = networks.clap()
    t = np.arange(32000, dtype=np.float32) / 16000
    audios = [Audio((0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), 16000) for f in (220, 440, 880)]
    embeddings = M.clap_embeddings(audios, model, extractor, batch_size=2)
    assert embeddings.shape == (3, 16)
    assert M.frechet_distance(embeddings, embeddings) == pytest.approx(0.0, abs=1e-6)
    texts = M.clap_text_embeddings(["low tone", "middle tone", "high tone"], model, tokenizer)
    cos = M.cosine(embeddings, texts)
    assert cos.shape == (3,) and bool(((cos >= -1) & (cos <= 1)).all())


def test_i3d_features_for_fvd(networks_dir):
    network = FeatureNetworks({"i3d": str(networks_dir["i3d"])}).i3d()
    rng = np.random.default_rng(0)
    clips = [Video(rng.integers(0, 255, (n, 40, 56, 3), dtype=np.uint8), 8.0) for n in (8, 20)]
    features = M.i3d_features(clips, network)
    assert features.shape == (2, 8)
    assert M.frechet_distance(features.repeat(2, 1), features.repeat(2, 1)) == pytest.approx(0.0, abs=1e-6)


@needs_java
def test_caption_metrics_identical_captions_score_one_and_spice_says_why_it_is_left_out():
    refs = {"1": ["a man rides a horse on the beach"], "2": ["two dogs play with a red ball"],
            "3": ["a bowl of soup on a wooden table"]}  # fmt: skip
    same = M.caption_scores(refs, {k: v[0] for k, v in refs.items()}, spice=True)
    for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert same["metrics"][name] == pytest.approx(1.0, abs=1e-6), name
    assert same["metrics"]["meteor"] > 0.95
    assert same["metrics"]["cider"] > 5  # CIDEr-D of perfect matches: 10 x the mean n-gram cosine
    assert set(same["per_sample"]) == set(refs)
    if "spice" in same["skipped"]:
        assert "CoreNLP" in same["skipped"]["spice"] or "Java" in same["skipped"]["spice"]
    other = M.caption_scores(refs, {"1": "a horse", "2": "a cat sleeps", "3": "soup"}, spice=False)
    assert other["metrics"]["bleu_1"] < 0.5 and other["metrics"]["cider"] < same["metrics"]["cider"]
    with pytest.raises(ValueError, match="without both"):
        M.caption_scores(refs, {"1": "x"}, spice=False)


# ------------------------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("Two dogs.", "2 dogs"), ("yes", "yes"), ("The cat", "cat"), ("dont know", "don't know"), ("1,000", "1000"),
     ("red/white", "red white"), ("A man's hat!", "man's hat")],
)  # fmt: skip
def test_vqa_answer_normalisation(answer, expected):
    assert normalize_answer(answer) == expected


def test_vqa_accuracy_counts_humans_three_make_full_marks():
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("blue", ["red"] * 10) == 0.0
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_vqa_normalisation_agrees_with_lmms_evals_evalai_processor():
    processors = pytest.importorskip(
        "lmms_eval.tasks._task_utils.vqa_eval_metric", reason="lmms-eval is not installed (optional extra 'lmms')"
    )
    processor = processors.EvalAIAnswerProcessor()
    # (EvalAI's processor also splits "'s" off a word, which the official evaluator does not: not compared)
    for answer in ["Two dogs.", "The cat", "dont know", "1,000", "red/white", "Yes!", "it is 3:30"]:
        assert normalize_answer(answer) == processor(answer), answer


# ------------------------------------------------------------------------------------------------------------
# data readers
# ------------------------------------------------------------------------------------------------------------


def test_readers_of_the_usual_benchmark_files(tmp_path, media_files):
    images = tmp_path / "val2014"
    images.mkdir()
    shutil.copy(media_files["image"], images / "COCO_val2014_000000000042.jpg")
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test", "cocoid": 42,
         "sentences": [{"raw": "A cat. "}, {"raw": "a small cat"}]},
        {"filepath": "val2014", "filename": "missing.jpg", "split": "test", "cocoid": 7, "sentences": [{"raw": "x"}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "train", "cocoid": 9,
         "sentences": [{"raw": "y"}]},
    ], "dataset": "coco"}  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    data = read_data(tmp_path / "dataset_coco.json")
    assert data.format == "coco-karpathy" and data.missing == ["7"]
    assert [(s.id, s.text, s.references, s.modality) for s in data.samples] == [
        ("42", "A cat.", ["A cat.", "a small cat"], Modality.IMAGE)
    ]

    shutil.copy(media_files["audio"], tmp_path / "abc123.wav")
    with (tmp_path / "test.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        writer.writerows([[1, "abc123", 30, "a dog barks"], [2, "abc123", 30, "barking"], [3, "zzz", 0, "rain"]])
    data = read_data(tmp_path / "test.csv")
    assert data.format == "audiocaps" and data.missing == ["zzz"]
    assert data.samples[0].references == ["a dog barks", "barking"] and data.samples[0].modality is Modality.AUDIO

    (tmp_path / "videos").mkdir()
    shutil.copy(media_files["video"], tmp_path / "videos" / "video7010.mp4")
    msrvtt = {"videos": [{"video_id": "video7010", "split": "test"}, {"video_id": "video1", "split": "train"}],
              "sentences": [{"video_id": "video7010", "caption": "a man sings"},
                            {"video_id": "video7010", "caption": "someone is singing"},
                            {"video_id": "video1", "caption": "x"}]}  # fmt: skip
    (tmp_path / "test_videodatainfo.json").write_text(json.dumps(msrvtt))
    data = read_data(tmp_path / "test_videodatainfo.json")
    assert data.format == "msrvtt" and [s.id for s in data.samples] == ["video7010"]
    assert data.samples[0].references == ["a man sings", "someone is singing"]

    questions = {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "What is it?",
                                                           "question_id": 420}]}  # fmt: skip
    answers = {"annotations": [{"question_id": 420, "image_id": 42, "answers": [{"answer": "cat"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    data = read_data(tmp_path / "q.json", media_root=images, annotations=tmp_path / "a.json")
    assert data.format == "vqav2" and data.samples[0].references == ["cat"] * 10
    assert data.samples[0].media == images / "COCO_val2014_000000000042.jpg"
    with pytest.raises(DatasetError, match="annotations"):
        read_data(tmp_path / "q.json")


def test_readers_name_the_file_record_and_field(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"image_name": "a.jpg"}]))
    with pytest.raises(DatasetError, match=r"bad.json: \[0\]\.caption: expected a non-empty string"):
        read_data(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(DatasetError, match="odd.json.*not a known evaluation format"):
        detect_format(tmp_path / "odd.json")
    with pytest.raises(DatasetError, match="no such file"):
        read_data(tmp_path / "absent.json")


def test_readers_on_nextgpt_sample_files(samples_dir):
    root = samples_dir / "T_X_pair_data"
    expected = {
        "cc3m/cc3m.json": ("nextgpt-cc3m", 20, 0, Modality.IMAGE),
        "cc3m/cc3m_comprehension.json": ("nextgpt-comprehension", 20, 0, Modality.IMAGE),
        "cc3m/cc3m_generation.json": ("nextgpt-generation", 20, 0, Modality.IMAGE),
        "audiocap/audiocap.json": ("nextgpt-audiocap", 20, 0, Modality.AUDIO),
        "webvid/webvid.json": ("nextgpt-webvid", 17, 3, Modality.VIDEO),
        "webvid/webvid_generation.json": ("nextgpt-generation", 17, 3, Modality.VIDEO),
    }
    for name, (format_name, count, missing, modality) in expected.items():
        data = read_data(root / name)
        assert (data.format, len(data.samples), len(data.missing)) == (format_name, count, missing), name
        assert all(s.media.is_file() and s.modality is modality for s in data.samples)
    comprehension = read_data(root / "cc3m/cc3m_comprehension.json").samples[0]
    assert "<image>" not in comprehension.prompt and comprehension.references == [comprehension.text]
    assert read_data(root / "cc3m/cc3m.json", limit=4).describe()["samples"] == 4


# ------------------------------------------------------------------------------------------------------------
# feature networks: local only, one clear error
# ------------------------------------------------------------------------------------------------------------


def test_a_missing_network_names_itself_its_metrics_and_every_place_looked(monkeypatch, tmp_path):
    monkeypatch.delenv("ANYGPT_EVAL_CLIP", raising=False)
    monkeypatch.setenv("ANYGPT_EVAL_CLAP", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        FeatureNetworks({"clip": str(tmp_path / "absent")}).locate("clip")
    message = str(info.value)
    for part in ("CLIP", "clip_score", "--clip", "$ANYGPT_EVAL_CLIP not set", "openai/clip-vit-large-patch14"):
        assert part in message
    with pytest.raises(FileNotFoundError, match=r"\$ANYGPT_EVAL_CLAP.*nowhere"):
        FeatureNetworks().locate("clap")
    with pytest.raises(FileNotFoundError, match="--i3d"):
        FeatureNetworks().locate("i3d")
    assert set(NETWORKS) == {"inception", "clip", "clap", "i3d"}


# ------------------------------------------------------------------------------------------------------------
# runs: report, predictions, contact sheet, resume
# ------------------------------------------------------------------------------------------------------------


def _counting(pipe):
    calls = []
    real_run = pipe.run

    def run(request, **kwargs):
        calls.append(request.id)
        return real_run(request, **kwargs)

    return calls, mock.patch.object(pipe, "run", side_effect=run)


def test_t2i_run_writes_its_files_and_resumes_without_redoing_samples(tiny_pipe, samples_dir, networks_dir, tmp_path):
    task = get_task("t2i")
    ctx = EvalContext(seed=5, networks=FeatureNetworks({"clip": str(networks_dir["clip"])}), metrics={"clip_score"},
                      generation={"num_inference_steps": 2}, out=tmp_path / "run")  # fmt: skip
    samples, data = task.samples(str(samples_dir / "T_X_pair_data/cc3m/cc3m.json"), ctx, limit=3)
    report = run_evaluation(task, tiny_pipe, samples, ctx, model="tiny", data=data, progress=False)
    out = ctx.out
    assert {p.name for p in out.iterdir()} >= {"report.json", "results.md", "contact_sheet.png", "predictions.jsonl"}
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"]["clip_score"]["n"] == 3 and saved["seed"] == 5
    assert saved["data"]["sha256"] and saved["versions"]["torchmetrics"] and "revision" in saved["git"]
    assert saved["feature_networks"] == {"clip": str(networks_dir["clip"])}
    lines = read_predictions(out / "predictions.jsonl")
    assert [r["seed"] for r in lines] == [5, 6, 7] and all((out / r["media"]["image"][0]).is_file() for r in lines)
    assert all("clip_score" in r["scores"] for r in lines)
    assert "| clip_score |" in (out / "results.md").read_text()
    assert Image.open(out / "contact_sheet.png").size[0] > 300

    with pytest.raises(UsageError, match="--resume"):
        run_evaluation(task, tiny_pipe, samples, ctx, model="tiny", data=data, progress=False)
    # an interruption during the third sample: two complete lines and a torn one
    text = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(text[:2]) + "\n" + text[2][:25])
    calls, patch = _counting(tiny_pipe)
    with patch:
        resumed = run_evaluation(task, tiny_pipe, samples, ctx, model="tiny", data=data, resume=True, progress=False)
    assert calls == [samples[2].id]
    assert resumed["metrics"]["clip_score"]["value"] == pytest.approx(report["metrics"]["clip_score"]["value"])
    other = EvalContext(**{**ctx.__dict__, "seed": 6})
    with pytest.raises(UsageError, match="seed"):
        run_evaluation(task, tiny_pipe, samples, other, model="tiny", data=data, resume=True, progress=False)


@needs_java
def test_caption_and_vqa_runs_score_the_replies(tiny_pipe, samples_dir, tmp_path):
    caption = get_task("caption")
    ctx = EvalContext(generation={"max_new_tokens": 6}, out=tmp_path / "caption")
    samples, data = caption.samples(str(samples_dir / "T_X_pair_data/cc3m/cc3m_comprehension.json"), ctx, limit=2)
    report = run_evaluation(caption, tiny_pipe, samples, ctx, model="tiny", data=data, progress=False)
    assert set(report["metrics"]) == set(caption.metrics)
    assert report["metrics"]["bleu_4"]["n"] == 2 and report["metrics"]["cider"]["value"] is not None
    line = read_predictions(ctx.out / "predictions.jsonl")[0]
    assert line["prompt"] == samples[0].prompt and line["references"] == samples[0].references

    images = tmp_path / "val2014"
    images.mkdir()
    shutil.copy(samples[0].media, images / "COCO_val2014_000000000001.jpg")
    questions = {"data_subtype": "val2014", "questions": [{"image_id": 1, "question": "what is shown?",
                                                           "question_id": 10}]}  # fmt: skip
    answers = {"annotations": [{"question_id": 10, "answers": [{"answer": "cricket"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    vqa = get_task("vqa")
    ctx = EvalContext(generation={"max_new_tokens": 4}, out=tmp_path / "vqa")
    samples, data = vqa.samples(str(tmp_path / "q.json"), ctx, limit=None, media_root=images,
                                annotations=tmp_path / "a.json")  # fmt: skip
    report = run_evaluation(vqa, tiny_pipe, samples, ctx, model="tiny", data=data, progress=False)
    line = read_predictions(ctx.out / "predictions.jsonl")[0]
    assert line["prompt"] == "what is shown?\nAnswer the question using a single word or phrase."
    assert report["metrics"]["vqa_accuracy"]["value"] == pytest.approx(
        100 * vqa_accuracy(line["text"], ["cricket"] * 10)
    )


def test_tasks_come_from_the_builtin_table_and_the_entry_points():
    names = task_names()
    assert names[: len(BUILTIN_TASKS)] == ["t2i", "t2a", "t2v", "caption", "vqa"]
    if "toyworld" not in names:
        pytest.skip("the anygpt.eval_tasks entry points are not installed (pip install -e .)")
    assert type(get_task("toyworld")).__module__ == "toyworld.eval_task"
    with pytest.raises(UsageError, match="unknown evaluation task 'nope'.*t2i"):
        get_task("nope")
    with pytest.raises(UsageError, match="not measured by t2v"):
        get_task("t2v").selected(EvalContext(metrics={"fid"}))


def test_toyworld_task_scores_with_the_oracles(tiny_pipe, tmp_path):
    if "toyworld" not in task_names():
        pytest.skip("the anygpt.eval_tasks entry points are not installed (pip install -e .)")
    from toyworld.evaluate import METRICS, TARGETS

    task = get_task("toyworld")
    ctx = EvalContext(generation={"max_new_tokens": 8, "num_inference_steps": 1}, out=tmp_path / "toy")
    samples, data = task.samples(None, ctx, limit=1)
    assert data["requests"] + data["caption_items"] == len(samples) and data["heldout_seed"] == 10_000
    report = run_evaluation(task, tiny_pipe, samples, ctx, model="tiny", data=data, progress=False)
    # the generation and captioning rows, each measured (the evaluator's other tasks are `anygpt toyworld eval`'s)
    measured = ("text_to_", "routing", "image_", "audio_", "video_")
    assert list(report["metrics"]) == [m for m in METRICS if m.startswith(measured)]
    assert all(m["n"] > 0 and m["value"] is not None for m in report["metrics"].values())
    assert report["metrics"]["routing"]["n"] == data["requests"]
    assert report["metrics"]["routing"]["target"] == TARGETS["routing"]
    assert all(0 <= m["value"] <= 1 for m in report["metrics"].values() if m["value"] is not None)


def test_eval_command_line(tmp_path, networks_dir, samples_dir, monkeypatch, capsys):
    from anygpt import cli

    monkeypatch.delenv("ANYGPT_EVAL_CLIP", raising=False)
    data = str(samples_dir / "T_X_pair_data/webvid/webvid.json")
    status = cli.main(["eval", "t2v", "--model", "tiny", "--data", data, "--out", str(tmp_path / "x"),
                       "--clip", str(tmp_path / "absent")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--clip" in err and "CLIP" in err
    status = cli.main(["eval", "t2v", "--model", "tiny", "--data", data, "--limit", "2", "--out", str(tmp_path / "v"),
                       "--clip", str(networks_dir["clip"]), "--steps", "1", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "| clipsim |" in out and "| fvd | - | 0 | not measured" in out
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["data"]["missing_media"] and report["metrics"]["clipsim"]["n"] == 2
    assert report["command"].startswith("anygpt eval t2v")


def test_contact_sheet_draws_every_modality(tmp_path, media_files):
    rng = np.random.default_rng(0)
    entries = [
        {"id": "a", "media": str(media_files["image"]), "prompt": "p", "text": "t", "reference": media_files["image"]},
        {"id": "b", "media": Audio(rng.normal(size=8000).astype(np.float32), 16000), "prompt": "q"},
        {"id": "c", "media": Video(rng.integers(0, 255, (5, 20, 30, 3), dtype=np.uint8), 4.0), "prompt": "r"},
        {"id": "d", "media": None, "prompt": "nothing"},
    ]
    path = write_contact_sheet(tmp_path / "sheet.png", entries, columns=2, title="t")
    assert Image.open(path).size == (2 * (2 * 160 + 12), 28 + 2 * (160 + 14 * 6 + 12))
    assert write_contact_sheet(tmp_path / "none.png", []) is None


# ------------------------------------------------------------------------------------------------------------
# lmms-eval (its own environment: `make test-lmms` runs these in .venv-lmms and fails if they skip)
# ------------------------------------------------------------------------------------------------------------

_LMMS_TASK = """task: anygpt_local_{name}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  until: ["###"]
process_results: !function utils.process_results
metric_list:
  - metric: answered
    aggregation: mean
    higher_is_better: true
  - metric: correct
    aggregation: mean
    higher_is_better: true
"""

_LMMS_UTILS = """import json
import os


def doc_to_visual(doc):
    return [doc["image"]] if doc.get("image") else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "<image>\\n" + doc["question"] if doc.get("image") else doc["question"]


def process_results(doc, results):
    reply = results[0]
    if reply.startswith("{"):
        reply = json.loads(reply)
        return {"answered": float(all(os.path.isfile(p) for p in reply["images"])), "correct": 0.0}
    return {"answered": float(isinstance(reply, str)), "correct": float(doc["answer"] in reply)}
"""


def _needs_lmms_eval() -> None:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra 'lmms', own environment)")
    from importlib.metadata import entry_points

    if not [e for e in entry_points(group="lmms_eval.models") if e.name == "anygpt"]:
        pytest.skip("the lmms_eval.models entry point is not installed (pip install -e .)")


def _lmms_task(folder: Path, name: str, docs: list[dict], max_new_tokens: int) -> Path:
    """A local lmms-eval task ``anygpt_local_<name>`` over ``docs`` (a JSON file); returns its include path."""
    tasks = folder / "tasks"
    tasks.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(docs))
    (tasks / "utils.py").write_text(_LMMS_UTILS)
    task = _LMMS_TASK.format(name=name, data=folder / f"{name}.json", max_new_tokens=max_new_tokens)
    (tasks / f"{name}.yaml").write_text(task)
    return tasks


def _run_lmms_eval(model_args: str, name: str, tasks: Path, out: Path) -> dict:
    """``lmms-eval --model anygpt --model_args ARGS`` on ``anygpt_local_<name>``: its results and logged samples."""
    script = Path(sys.executable).with_name("lmms-eval")  # the console script, as a user types it
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "lmms_eval"]
    command = [*program, "--model", "anygpt", "--model_args", model_args, "--tasks", f"anygpt_local_{name}",
               "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
               "--batch_size", "1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tasks.parent)
    results = [json.loads(p.read_text()) for p in out.rglob("*results.json")]  # lmms-eval exits 0 on errors
    assert done.returncode == 0 and results, done.stdout[-3000:] + done.stderr[-3000:]
    samples = [json.loads(line) for p in out.rglob("*samples_*.jsonl") for line in p.read_text().splitlines()]
    return {"results": results[0]["results"][f"anygpt_local_{name}"], "samples": samples}


def _lmms_reply(sample: dict) -> str:
    reply = sample["filtered_resps"]
    while isinstance(reply, list):  # one response per request
        (reply,) = reply
    return reply


def test_lmms_eval_runs_a_local_task_with_the_anygpt_model(tmp_path, samples_dir):
    _needs_lmms_eval()
    image = next((samples_dir / "T_X_pair_data/cc3m/images").glob("*.jpg"))
    docs = [{"question": "what is in the picture?", "image": str(image), "answer": "x"},
            {"question": "say hello", "image": "", "answer": "hello"}]  # fmt: skip
    tasks = _lmms_task(tmp_path, "understand", docs, max_new_tokens=6)
    text = _run_lmms_eval("pretrained=tiny", "understand", tasks, tmp_path / "text")
    assert text["results"]["answered,none"] == 1.0 and len(text["samples"]) == 2
    # the image-generation contract: {"text", "images": [paths]}, the files written
    model_args = f"pretrained=tiny,modalities=image,output_dir={tmp_path / 'media'}"
    images = _run_lmms_eval(model_args, "understand", tasks, tmp_path / "image")
    assert images["results"]["answered,none"] == 1.0
    reply = json.loads(_lmms_reply(images["samples"][0]))
    assert set(reply) == {"text", "images"} and Path(reply["images"][0]).parent == tmp_path / "media"


def test_lmms_eval_anygpt_model_with_toyworld_names_each_toy_picture(tmp_path):
    """``--model anygpt --model_args pretrained=toyworld``: the shipped model's own answers, word for word."""
    from toyworld.world import ImageItem

    _needs_lmms_eval()
    pictures = [("red", "circle"), ("blue", "square"), ("yellow", "triangle")]
    docs = []
    for colour, shape in pictures:
        path = tmp_path / f"{colour}_{shape}.png"
        Image.fromarray(ImageItem(colour, shape).render()).save(path)
        docs.append({"question": "what is in this image?", "image": str(path), "answer": f"It is a {colour} {shape}."})
    docs.append({"question": "hello", "image": "", "answer": "Hello!"})
    tasks = _lmms_task(tmp_path, "toys", docs, max_new_tokens=16)
    run = _run_lmms_eval("pretrained=toyworld", "toys", tasks, tmp_path / "out")
    replies = {sample["target"]: _lmms_reply(sample) for sample in run["samples"]}
    assert len(run["samples"]) == len(docs)
    for colour, shape in pictures:
        assert replies[f"It is a {colour} {shape}."] == f"It is a {colour} {shape}."
    assert replies["Hello!"].startswith("Hello! I can draw shapes")
    assert run["results"]["correct,none"] == 1.0 and run["results"]["answered,none"] == 1.0
