"""S* for the web UIs: `dyod export`, checked against the way AUTOMATIC1111, ComfyUI and InvokeAI read an embedding
file."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dyod
from dyod.cli import main
from dyod.embeddings import load_learned_embeds, read_textual_inversion
from dyod.errors import DyodError


def a1111_reads(path) -> tuple[str, torch.Tensor]:
    """How AUTOMATIC1111's web UI reads a .safetensors embedding (modules/textual_inversion/textual_inversion.py):
    ``EmbeddingDatabase.load_from_file`` takes the name from the file, ``name, ext = os.path.splitext(filename)``, and
    ``data = safetensors.torch.load_file(path, device="cpu")``; ``create_embedding_from_data`` then finds no
    'string_to_param' and no 'clip_g'/'clip_l', so it takes the "diffuser concepts" branch:
    ``assert len(data.keys()) == 1, 'embedding file has multiple terms in it'``, ``emb = next(iter(data.values()))``,
    ``if len(emb.shape) == 1: emb = emb.unsqueeze(0)``, ``vec = emb.detach().to(..., dtype=torch.float32)``,
    ``vectors = vec.shape[0]``."""
    import os

    name, _ = os.path.splitext(os.path.basename(path))
    data = load_file(str(path), device="cpu")
    assert "string_to_param" not in data and not ("clip_g" in data and "clip_l" in data)
    assert type(data) == dict and type(next(iter(data.values()))) == torch.Tensor  # noqa: E721 (as A1111 checks)
    assert len(data.keys()) == 1, "embedding file has multiple terms in it"
    emb = next(iter(data.values()))
    if len(emb.shape) == 1:
        emb = emb.unsqueeze(0)
    return name, emb.detach().to(dtype=torch.float32)


def comfyui_reads(path, embed_key: str = "clip_l") -> torch.Tensor:
    """How ComfyUI reads it (comfy/sd1_clip.py, ``load_embed``): ``embed = safetensors.torch.load_file(embed_path,
    device="cpu")``; without 'string_to_param' and without ``embed_key`` ('clip_l' for SD 1.x) in it,
    ``values = embed.values(); embed_out = next(iter(values))``; the prompt's ``embedding:NAME`` then becomes
    ``[(embed[x], weight) for x in range(embed.shape[0])]``, one token per vector, in order."""
    embed = load_file(str(path), device="cpu")
    assert "string_to_param" not in embed and embed_key not in embed
    return next(iter(embed.values()))


def invokeai_reads(path) -> tuple[int, torch.Tensor]:
    """How InvokeAI reads it: its probe takes the token width as ``state_dict["emb_params"].shape[-1]`` (the
    textual-inversion config's ``elif "emb_params" in state_dict``), and ``TextualInversionModelRaw.from_checkpoint``,
    after 'string_to_param', takes ``elif "emb_params" in state_dict: result.embedding = state_dict["emb_params"]``
    (its "v3" format)."""
    state_dict = load_file(str(path), device="cpu")
    assert "string_to_param" not in state_dict and "string_to_token" not in state_dict and "emb_params" in state_dict
    return state_dict["emb_params"].shape[-1], state_dict["emb_params"]


def test_export_for_the_web_uis_reads_back_as_the_same_s_star(tmp_path, fitted_run, tiny_model, shapes):
    _, learned = load_learned_embeds(fitted_run / "learned_embeds.safetensors")
    out = tmp_path / "shapes-prompt.safetensors"
    assert main(["export", str(fitted_run), "--format", "a1111", "--out", str(out)]) == 0
    name, vec = a1111_reads(out)
    assert name == "shapes-prompt" and torch.equal(vec, learned)
    assert torch.equal(comfyui_reads(out), learned)
    width, embedding = invokeai_reads(out)
    assert width == learned.shape[-1] and torch.equal(embedding, learned)
    with safe_open(str(out), "pt") as f:  # what the UIs show about it: a name, the steps, the model
        meta = f.metadata()
    info = json.loads((fitted_run / "run.json").read_text())
    assert meta["name"] == "shapes-prompt" and meta["step"] == "5" and meta["sd_checkpoint_name"] == info["model"]
    # dyod's own import takes it back (the web UI's file names no token: --placeholder-token gives one)
    token, vectors = read_textual_inversion(out, token="<shapes>")
    assert token == "<shapes>" and torch.equal(vectors, learned)
    from dyod.inversion import import_dataset_prompt

    imported = import_dataset_prompt(shapes, tiny_model, tmp_path / "again", out, token="<shapes>")
    assert torch.equal(load_learned_embeds(imported)[1], learned)

    diffusers_file = dyod.export_embedding(fitted_run, tmp_path / "learned.safetensors", "diffusers")
    assert load_file(str(diffusers_file)).keys() == load_file(str(fitted_run / "learned_embeds.safetensors")).keys()
    assert torch.equal(read_textual_inversion(diffusers_file)[1], learned)


def test_a_multi_vector_s_star_keeps_every_vector_in_order(tmp_path, fitted_run):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(fitted_run, run)
    vectors = torch.arange(3 * 32, dtype=torch.float32).reshape(3, 32)
    save_file({"<dyod>": vectors}, str(run / "learned_embeds.safetensors"))
    out = dyod.export_embedding(run, tmp_path / "three.safetensors", "a1111")
    assert torch.equal(a1111_reads(out)[1], vectors) and torch.equal(comfyui_reads(out), vectors)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["num_vectors"] == "3"


def test_what_cannot_be_exported_is_refused_with_the_reason(tmp_path, fitted_run, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(fitted_run, bare)
    (bare / "learned_embeds.safetensors").unlink()
    with pytest.raises(DyodError, match="has no dataset prompt S\\*.*dyod invert"):
        dyod.export_embedding(bare, tmp_path / "x.safetensors", "a1111")
    for out, message in ((tmp_path / "x.pt", "ending in .safetensors"),):
        assert main(["export", str(fitted_run), "--format", "a1111", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    out = dyod.export_embedding(fitted_run, tmp_path / "once.safetensors", "a1111")
    assert main(["export", str(fitted_run), "--format", "a1111", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(fitted_run), "--format", "a1111", "--out", str(out), "--overwrite"]) == 0
    damaged = tmp_path / "nan"
    shutil.copytree(fitted_run, damaged)
    _, vectors = load_learned_embeds(fitted_run / "learned_embeds.safetensors")
    save_file({"<dyod>": vectors * float("nan")}, str(damaged / "learned_embeds.safetensors"))
    with pytest.raises(DyodError, match="non-finite"):
        dyod.export_embedding(damaged, tmp_path / "nan.safetensors", "a1111")
    assert not (tmp_path / "nan.safetensors").exists()
