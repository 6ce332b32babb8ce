"""The pseudo-word S*: placeholder tokens in the tokenizer, their trainable rows, and diffusers' file format.

Only the new rows train: the frozen embedding table is looked up as usual and the placeholder ids are swapped for
a small parameter, so every other row stays bit-identical and the optimizer holds state for the new rows only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import DyodError, write_atomically

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "learned_embeds.safetensors"


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """diffusers' multi-vector convention: ``<tok>``, ``<tok>_1``, ..., ``<tok>_{k-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, token: str, num_vectors: int) -> str:
    """Write S* into a prompt template ("a photo of {}") and expand a multi-vector token as diffusers does."""
    if "{}" not in prompt and token not in prompt:
        raise DyodError(f"the prompt {prompt!r} must contain {{}} (or {token}) where the learned token goes")
    text = prompt.replace("{}", token)
    if num_vectors > 1:
        text = text.replace(token, " ".join(placeholder_tokens(token, num_vectors)))
    return text


def add_placeholder_tokens(tokenizer, text_encoder, token: str, num_vectors: int) -> list[int]:
    """Add S* (and its extra vectors) to the tokenizer and grow the embedding table; return the new ids."""
    tokens = placeholder_tokens(token, num_vectors)
    vocab = tokenizer.get_vocab()
    clashes = [t for t in tokens if t in vocab]
    if clashes:
        raise DyodError(
            f"the placeholder token {clashes[0]!r} already exists in the tokenizer's vocabulary "
            f"(id {vocab[clashes[0]]}); choose another --placeholder-token, e.g. '<my-dataset>'"
        )
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise DyodError(f"the tokenizer refused some of the placeholder tokens {tokens}")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    try:  # the new rows are overwritten anyway: skip transformers' mean/covariance initialization
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    except TypeError:  # transformers < 4.46
        text_encoder.resize_token_embeddings(len(tokenizer))
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise DyodError(f"placeholder ids {ids} are not contiguous; the tokenizer has holes in its vocabulary")
    return ids


def initializer_embedding(tokenizer, text_encoder, word: str) -> torch.Tensor:
    """The embedding of an initializer word (the mean of its tokens' rows when it takes several tokens)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise DyodError(f"the initializer word {word!r} encodes to no tokens; pass a plain word such as 'object'")
    if len(ids) > 1:
        logger.info("initializer %r takes %d tokens; using the mean of their embeddings", word, len(ids))
    weight = text_encoder.get_input_embeddings().weight
    return weight[ids].detach().float().mean(0)


class PlaceholderEmbedding(torch.nn.Module):
    """Token embedding whose rows ``first_id .. first_id + k - 1`` come from a trainable [k, dim] parameter."""

    def __init__(self, base: torch.nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.first_id = first_id
        self.learned = torch.nn.Parameter(init.clone().float())

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight (e.g. for dtype)
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        is_new = input_ids >= self.first_id
        index = (input_ids - self.first_id).clamp(0, self.learned.shape[0] - 1)
        return torch.where(is_new[..., None], self.learned[index].to(embeds.dtype), embeds)


def install_placeholder(text_encoder, first_id: int, init: torch.Tensor) -> PlaceholderEmbedding:
    module = PlaceholderEmbedding(text_encoder.get_input_embeddings(), first_id, init)
    text_encoder.set_input_embeddings(module)
    return module


def uninstall_placeholder(text_encoder) -> None:
    """Write the learned rows into the real table and put the plain nn.Embedding back."""
    module = text_encoder.get_input_embeddings()
    if isinstance(module, PlaceholderEmbedding):
        with torch.no_grad():
            k = module.learned.shape[0]
            module.base.weight[module.first_id : module.first_id + k] = module.learned.to(module.base.weight.dtype)
        text_encoder.set_input_embeddings(module.base)


def save_learned_embeds(path: str | os.PathLike, token: str, vectors: torch.Tensor) -> None:
    """diffusers' format: ``{token: tensor[num_vectors, dim]}``, loadable by ``load_textual_inversion``."""
    tensors = {token: vectors.detach().float().cpu().contiguous()}
    write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp)), "dataset prompt")


def _read_embedding_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise DyodError(f"{path} is a pickle file; dyod loads embeddings only from .safetensors (pickles can run code)")
    if not path.exists():
        raise DyodError(f"{path} does not exist")
    if path.is_dir():
        raise DyodError(f"{path} is a folder; give the embedding's .safetensors file (e.g. {path / EMBEDDINGS_FILE})")
    try:
        return load_file(str(path))
    except Exception as e:
        raise DyodError(f"{path} is not a readable safetensors file: {e}") from None


def load_learned_embeds(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    path = Path(path)
    state = _read_embedding_file(path)
    if len(state) != 1:
        raise DyodError(f"{path} must hold exactly one token (diffusers' format), found {sorted(state)}")
    token, vectors = next(iter(state.items()))
    if vectors.ndim == 1:
        vectors = vectors[None]
    if not torch.isfinite(vectors).all():  # it would turn every image it conditions to NaN: black PNGs
        raise DyodError(f"{path} holds non-finite values (NaN or inf): the dataset prompt cannot condition the model; "
                        "learn it again (`dyod invert DATA --model MODEL --out RUN --overwrite`) or import a sound "
                        "one with --embedding")
    return token, vectors


def read_textual_inversion(path: str | os.PathLike, token: str | None = None) -> tuple[str, torch.Tensor]:
    """A textual-inversion embedding learned elsewhere, as (token, vectors [K, dim]): diffusers' format
    (``{token: [K, dim]}`` or ``[dim]``, what its textual-inversion example and dyod write) or the AUTOMATIC1111 web
    UI's safetensors (``emb_params``: [K, dim], no token in the file). ``token`` renames the first; the second needs
    one."""
    path = Path(path)
    state = _read_embedding_file(path)
    if {"clip_l", "clip_g"} & set(state):
        raise DyodError(f"{path} is a Stable Diffusion XL embedding (clip_l, clip_g: one per text encoder); dyod "
                        "customizes Stable Diffusion 1.x / 2.x models, whose one text encoder takes one embedding")
    if "emb_params" in state:  # the web UI's: the token is the file's name there, chosen by the user here
        if token is None:
            raise DyodError(f"{path} is an AUTOMATIC1111 embedding, which names no token; give the word that stands "
                            "for it (--placeholder-token, e.g. '<my-dataset>')")
        vectors = state["emb_params"]
    elif len(state) == 1:
        found, vectors = next(iter(state.items()))
        token = token or found
    else:
        raise DyodError(f"{path} is no textual-inversion embedding dyod reads: diffusers' format holds one token "
                        f"(its vectors), the AUTOMATIC1111 web UI's an 'emb_params' tensor; found {sorted(state)[:8]}")
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not len(vectors):
        raise DyodError(f"{path}: the embedding is a tensor of shape {tuple(vectors.shape)}; a textual inversion is "
                        "[vectors, width] (or [width])")
    if not torch.isfinite(vectors).all():
        raise DyodError(f"{path}: the embedding holds non-finite values (NaN or inf); it cannot condition a model")
    return token, vectors.float()


def load_into(tokenizer, text_encoder, token: str, vectors: torch.Tensor) -> None:
    """Add a learned S* to a tokenizer and text encoder (what ``load_textual_inversion`` does in diffusers)."""
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[-1] != dim:
        raise DyodError(
            f"the embedding for {token!r} is {vectors.shape[-1]} wide but this text encoder's is {dim} wide "
            "(SD 1.x uses 768, SD 2.x 1024): it was learned for another model"
        )
    ids = add_placeholder_tokens(tokenizer, text_encoder, token, vectors.shape[0])
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[ids[0] : ids[0] + len(ids)] = vectors.to(weight.dtype).to(weight.device)
