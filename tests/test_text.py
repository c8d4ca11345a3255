"""Tests of defectfusion.model.text: prompt files, the offline MiniLM encoder, `defectfusion text
embed`, and one-line errors for unknown encoders and missing weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from common import NAMES
from defectfusion import cli
from defectfusion.core.errors import UserError
from defectfusion.data.coco import make_coco, write_split
from defectfusion.model.text import (
    embed_prompts,
    encode,
    load_embeddings,
    read_prompts,
    save_embeddings,
)

ROOT = Path(__file__).resolve().parents[1]
SYNTH_PROMPTS = ROOT / "prompts" / "synth.yaml"


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def write_prompts(path: Path, classes: dict) -> Path:
    path.write_text(yaml.safe_dump({"classes": classes}), encoding="utf-8")
    return path


# ---- prompt files ------------------------------------------------------------------------


def test_read_prompts_of_the_synth_dataset() -> None:
    names, prompts = read_prompts(SYNTH_PROMPTS, NAMES)
    assert names == NAMES and len(prompts) == 6
    assert all(p and "\n" not in p and "  " not in p for p in prompts)  # folded, one line each


def test_missing_class_id_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_prompts(
        tmp_path / "p.yaml", {0: {"name": "a", "prompt": "x"}, 2: {"name": "c", "prompt": "z"}}
    )
    with pytest.raises(UserError) as e:
        read_prompts(path)
    msg = one_line(e)
    assert str(path) in msg and "0..K-1" in msg and "[0, 2]" in msg


def test_name_mismatch_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_prompts(
        tmp_path / "p.yaml", {0: {"name": "a", "prompt": "x"}, 1: {"name": "b", "prompt": "y"}}
    )
    with pytest.raises(UserError) as e:
        read_prompts(path, ["a", "crack"])
    msg = one_line(e)
    assert str(path) in msg and "'crack'" in msg and "'b'" in msg


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("classes: [unclosed", "malformed YAML"),
        ("other: 1", "expected a mapping"),
        ("classes:\n  0: {name: a}", "class 0 needs"),
    ],
)
def test_malformed_prompt_files_are_one_line_errors(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_prompts(path)
    assert expected in one_line(e)
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "none.yaml")


# ---- encoders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_minilm() -> dict:
    return embed_prompts(SYNTH_PROMPTS, "minilm", class_names=NAMES)


def test_minilm_embeds_the_synth_prompts_offline(synth_minilm: dict, tmp_path: Path) -> None:
    emb, info = synth_minilm["embeddings"], synth_minilm["info"]
    assert emb.shape == (6, 384) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert info["dim"] == 384 and info["encoder"] == "minilm" and info["class_names"] == NAMES
    cos = torch.tensor(info["cosine"])
    assert cos.shape == (6, 6) and torch.allclose(cos.diagonal(), torch.ones(6), atol=1e-5)
    assert torch.allclose(cos, cos.T, atol=1e-6) and (cos.fill_diagonal_(0).abs() < 0.99).all()

    out = save_embeddings(tmp_path / "t.pt", synth_minilm)
    loaded, saved_info = load_embeddings(out)
    assert torch.equal(loaded, emb) and saved_info == json.loads(json.dumps(info))
    sidecar = json.loads((tmp_path / "t.json").read_text())
    assert sidecar["cosine"] == info["cosine"] and len(sidecar["prompt_sha256"]) == 64


def test_minilm_is_deterministic(synth_minilm: dict) -> None:
    again = embed_prompts(SYNTH_PROMPTS, "minilm", class_names=NAMES)
    assert torch.equal(again["embeddings"], synth_minilm["embeddings"])


def test_unknown_encoder_is_a_one_line_error() -> None:
    with pytest.raises(UserError) as e:
        encode(["a scratch"], "bert-of-the-future")
    msg = one_line(e)
    assert "unknown text encoder" in msg and "minilm" in msg and "clip-vit-b-32" in msg


def test_missing_clip_weights_say_how_to_get_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as hub

    # Never touch the network, and do not find weights someone cached on this machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as e:
        encode(["a scratch"], "clip-vit-b-32")
    msg = one_line(e)
    assert "clip-vit-b-32" in msg and "text.weights" in msg and "text.encoder=minilm" in msg
    with pytest.raises(UserError) as e:  # a named weights file that is not there
        encode(["a scratch"], "clip-vit-b-32", str(tmp_path / "ViT-B-32.pt"))
    assert "text.weights" in one_line(e)


def test_load_embeddings_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="defectfusion text embed"):
        load_embeddings(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a text-embeddings file"):
        load_embeddings(tmp_path / "junk.pt")


@pytest.mark.parametrize(
    "embeddings",
    [
        torch.full((6, 8), float("nan")),
        torch.zeros(6),
        torch.zeros(6, 9000),
        torch.zeros(6, 8, dtype=torch.long),
    ],
    ids=["nan", "1-d", "too-wide", "integer"],
)
def test_embeddings_from_a_remote_are_checked_like_a_checkpoint(
    embeddings: torch.Tensor, tmp_path: Path
) -> None:
    """results/text/embeddings.pt is a DVC output: its tensor is held to the checkpoint's
    limits before Phase 2 builds a fusion from it (issue 27's neighbours)."""
    path = save_embeddings(tmp_path / "e.pt", {"embeddings": embeddings, "info": {"encoder": "x"}})
    with pytest.raises(UserError, match="remake them") as e:
        load_embeddings(path)
    assert "\n" not in str(e.value)


# ---- the command -------------------------------------------------------------------------


def write_config(tmp_path: Path, data_dir: Path, encoder: str = "minilm") -> Path:
    cfg = {
        "data": {"dir": str(data_dir)},
        "text": {"encoder": encoder, "prompts": str(SYNTH_PROMPTS)},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_text_embed_command(
    tmp_path: Path, synth_minilm: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, tmp_path / "no-dataset-here")
    out = tmp_path / "emb" / "text.pt"
    assert cli.main(["text", "embed", "--config", str(cfg), "--out", str(out)]) == 0
    emb, info = load_embeddings(out)
    assert emb.shape == (6, 384) and info["class_names"] == NAMES
    assert torch.equal(emb, synth_minilm["embeddings"])
    assert (tmp_path / "emb" / "text.json").is_file()
    assert "(6, 384)" in capsys.readouterr().out


def test_text_embed_checks_the_datasets_class_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "ds"
    write_split(data, "train", make_coco([], [], ["normal", "crack"], {"dataset": "t"}))
    cfg = write_config(tmp_path, data)
    assert cli.main(["text", "embed", "--config", str(cfg), "--out", str(tmp_path / "t.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not match" in err and "'crack'" in err
    assert not (tmp_path / "t.pt").exists()


def test_text_embed_unknown_encoder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, tmp_path / "none", encoder="no-such-encoder")
    assert cli.main(["text", "embed", "--config", str(cfg), "--out", str(tmp_path / "t.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown text encoder" in err
