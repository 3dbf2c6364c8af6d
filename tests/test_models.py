import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main
from posttrain.data import chat
from posttrain.errors import UserError
from posttrain.models import load_model, load_tokenizer, resolve


def test_tiny_model_from_the_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the number {i} is {'even' if i % 2 == 0 else 'odd'}" for i in range(200)))
    out = tmp_path / "tiny"
    assert main(["model", "tiny", "--output", str(out), "--text", str(corpus), "--vocab-size", "300",
                 "--hidden-size", "32", "--layers", "1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    ids = tok("the number 123 is odd", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the number 123 is odd"
    assert [tok.decode([i]) for i in tok("123", add_special_tokens=False)["input_ids"]] == ["1", "2", "3"]
    assert tok.chat_template and tok.eos_token == "</s>" and tok.pad_token == "<pad>"


def test_smollm2_alias_is_cached_as_plain_safetensors(smollm2_dir):
    d = Path(smollm2_dir)
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.gguf"))
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    assert resolve("smollm2-135m-instruct") == smollm2_dir
    model = load_model("smollm2-135m-instruct")
    assert model.dtype == torch.float32 and not getattr(model, "hf_quantizer", None)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = load_tokenizer("smollm2-135m-instruct")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_gemma3_base_alias_is_cached_with_its_license_and_continues_text():
    """The Gemma 3 270M base model: assembled from its package, dequantized once, its license in a model
    card that every manifest's ``model_license`` follows; a base model, it continues plain text."""
    from posttrain.models import license_of

    d = Path(resolve("gemma3-270m"))
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.gguf")) and not list(d.parent.glob(".gguf-*"))
    assert license_of("gemma3-270m") == license_of(str(d)) == "gemma"
    model, tok = load_model("gemma3-270m"), load_tokenizer("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert not model.config.final_logit_softcapping  # a plain head: TokenLogProbs' fast, chunked path
    ids = tok("Question: What is 12 + 7?\nAnswer:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "19" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    chat.apply_template(tok, chat.resolve_template(tok, "gemma")[0])  # its turn tokens, for SFT
    prompt = chat.prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    assert prompt[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<start_of_turn>") in prompt
    assert tok.convert_tokens_to_ids("<end_of_turn>") in chat.stop_token_ids(tok)


def test_missing_model_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="could not load"):
        load_tokenizer(str(tmp_path))
