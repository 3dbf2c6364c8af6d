"""SFT: losses against independent references, packing, accumulation, determinism, learning, outputs."""

import json

import pytest
import torch
from conftest import addition_records, multi_turn_records, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import SFTConfig
from posttrain.config_io import load_config
from posttrain.data import chat, packing
from posttrain.errors import UserError
from posttrain.logprobs import TokenLogProbs, collate
from posttrain.models import load_model, load_tokenizer
from posttrain.train.sft import run_sft, sft_objective, tokenize_records


def sft(tmp_path, model, data, name="run", **kw):
    base = {"model": str(model), "output_dir": str(tmp_path / name), "chat_template": "tulu",
            "datasets": [{"path": str(data), "license": "CC0-1.0"}], "max_seq_length": 64,
            "per_device_train_batch_size": 4, "learning_rate": 3e-3, "max_steps": 4, "save_steps": 0}
    return run_sft(load_config(SFTConfig, base={**base, **kw}))


def samples_for(tok, records, max_length=128):
    chat.apply_template(tok, chat.TULU)
    samples, _ = tokenize_records(tok, records, max_length)
    return samples


def weights(path):
    return load_file(str(path / "model.safetensors"))


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_token_logprobs_match_the_models_own_loss(tiny_model_dir):
    """Reference: transformers' own causal-LM loss (full logits, attention mask, mean over labels)."""
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    rows = packing.unpacked(samples_for(tok, multi_turn_records(6)))
    batch = collate(rows, tok.pad_token_id)
    ours = -TokenLogProbs(model)(batch["input_ids"], batch["position_ids"], batch["labels"]).sum() / batch["num_tokens"]
    attention = torch.zeros_like(batch["input_ids"])
    for i, r in enumerate(rows):
        attention[i, :len(r["input_ids"])] = 1
    ref = model(input_ids=batch["input_ids"], attention_mask=attention, labels=batch["labels"]).loss
    assert float((ours - ref).abs()) <= 1e-5
    # the slow path (full logits) agrees with the fast one
    slow = TokenLogProbs(model)
    slow.fast = False
    assert torch.allclose(slow(batch["input_ids"], batch["position_ids"], batch["labels"]),
                          TokenLogProbs(model)(batch["input_ids"], batch["position_ids"], batch["labels"]), atol=1e-5)


def test_chunked_head_gives_the_unchunked_values_and_gradients(tiny_model_dir, monkeypatch):
    """A large vocabulary's head runs over checkpointed chunks of tokens; in float64 the log-probs and
    gradients equal the unchunked ones up to rounding (1e-12: chunk sums add in another order)."""
    from posttrain import logprobs

    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir)).double()
    batch = collate(packing.unpacked(samples_for(tok, multi_turn_records(6))), tok.pad_token_id)

    def run():
        model.zero_grad()
        lp = TokenLogProbs(model, temperature=0.7)(batch["input_ids"], batch["position_ids"], batch["labels"])
        (lp * torch.linspace(0.5, 1.5, lp.numel(), dtype=lp.dtype).view_as(lp)).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, whole_grads = run()
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 7 * vocab)  # 7 tokens a chunk
    assert batch["num_tokens"] > 7 * 3
    chunked, chunked_grads = run()
    assert float((chunked - whole).abs().max()) <= 1e-12  # a row's matmul may block differently per chunk
    assert max_diff(chunked_grads, whole_grads) <= 1e-12


@pytest.mark.parametrize("tokens_a_chunk", [7, None])
def test_a_frozen_head_gives_the_models_own_values_and_gradients(tiny_model_dir, monkeypatch, tokens_a_chunk):
    """With the head frozen (freeze_embeddings), FrozenHeadLogProbs computes the hidden states'
    gradient in the forward pass. Reference: transformers' own full logits, log-softmax at temperature
    0.7 and autograd, in float64; they agree to rounding (1e-12 of the gradient's scale)."""
    from posttrain import logprobs

    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir)).double()
    model.get_input_embeddings().weight.requires_grad_(False)
    batch = collate(packing.unpacked(samples_for(tok, multi_turn_records(6))), tok.pad_token_id)
    weight = torch.linspace(0.5, 1.5, batch["labels"][:, 1:].numel(), dtype=torch.float64).view(batch["labels"][:, 1:].shape)
    if tokens_a_chunk:
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", tokens_a_chunk * model.get_output_embeddings().weight.shape[0])
        assert batch["num_tokens"] > tokens_a_chunk * 3
    calls = []
    monkeypatch.setattr(logprobs.FrozenHeadLogProbs, "apply", lambda *a, f=logprobs.FrozenHeadLogProbs.apply: calls.append(1) or f(*a))

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return out

    fused = TokenLogProbs(model, temperature=0.7)(batch["input_ids"], batch["position_ids"], batch["labels"])
    (fused * weight).sum().backward()
    fused_grads = grads()
    assert calls == [1]
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1] / 0.7
    target = batch["labels"][:, 1:]
    sel = target != -100
    ref = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * sel
    (ref * weight).sum().backward()
    ref_grads = grads()
    assert float((fused - ref).detach().abs().max()) <= 1e-12
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    assert set(fused_grads) == set(ref_grads) and "model.embed_tokens.weight" not in fused_grads
    assert max_diff(fused_grads, ref_grads) <= 1e-12 * scale


def disjoint_additions(tmp_path, train: list[dict]) -> list[dict]:
    """20 single-digit additions none of the training records asks, as an ``eval_datasets`` entry."""
    asked = {r["messages"][0]["content"] for r in train}
    held = [r for r in addition_records(100, seed=1) if r["messages"][0]["content"] not in asked][:20]
    assert len(held) == 20
    return [{"path": str(write_jsonl(tmp_path / "h.jsonl", held))}]


def heldout_losses(run_dir) -> list[float]:
    """The held-out loss after each step (``eval_steps: 1``), the final evaluation last."""
    return [r["eval/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]


def test_freeze_embeddings_trains_everything_but_the_embeddings(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", addition_records(40))
    heldout = disjoint_additions(tmp_path, addition_records(40))
    res = sft(tmp_path, tiny_model_dir, data, packing=True, freeze_embeddings=True, save_steps=2, eval_datasets=heldout,
              eval_steps=1)
    trained, base = weights(res.output_dir), weights(tiny_model_dir)
    unmoved = {k for k in base if torch.equal(trained[k], base[k])}
    assert unmoved == {"model.embed_tokens.weight"}
    losses = heldout_losses(res.output_dir)  # measured 5.40, 5.25, 5.20, 5.17
    assert losses == sorted(losses, reverse=True) and losses[0] - losses[-1] > 0.2, losses
    # a row copied before training, then kept (frozen): the saved model has it
    res = sft(tmp_path, tiny_model_dir, data, "copied", freeze_embeddings=True, init_embeddings_from={"<pad>": "</s>"})
    tok, emb = load_tokenizer(str(tiny_model_dir)), weights(res.output_dir)["model.embed_tokens.weight"]
    pad, eos = tok.convert_tokens_to_ids("<pad>"), tok.convert_tokens_to_ids("</s>")
    assert torch.equal(emb[pad], emb[eos]) and not torch.equal(base["model.embed_tokens.weight"][pad], emb[pad])
    with pytest.raises(UserError, match="init_embeddings_from: '<nope>' is not a token of the vocabulary"):
        sft(tmp_path, tiny_model_dir, data, "d", init_embeddings_from={"<nope>": "</s>"})
    with pytest.raises(UserError, match="add_tokens needs trained embeddings"):
        sft(tmp_path, tiny_model_dir, data, "b", freeze_embeddings=True, add_tokens=["<x>"])
    with pytest.raises(UserError, match="freeze_embeddings with parallel: fsdp"):
        sft(tmp_path, tiny_model_dir, data, "c", freeze_embeddings=True, parallel="fsdp")


def test_packed_loss_equals_unpacked_loss(tiny_model_dir):
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    samples = samples_for(tok, multi_turn_records(12) + addition_records(12))
    rows = packing.pack(samples, 96)
    assert len(rows) < len(samples) and max(r["num_samples"] for r in rows) > 2
    policy = TokenLogProbs(model)

    def total(rs):
        b = collate(rs, tok.pad_token_id)
        lp = policy(b["input_ids"], b["position_ids"], b["labels"])
        return lp.sum(), b["num_tokens"]

    packed, n1 = total(rows)
    unpacked, n2 = total(packing.unpacked(samples))
    assert n1 == n2
    assert abs(float(packed / n1 - unpacked / n2)) <= 1e-5
    # and per sample, each separately: the same sum
    one_by_one = sum(float(total([r])[0]) for r in packing.unpacked(samples))
    assert abs(float(packed) - one_by_one) / abs(one_by_one) <= 1e-5


def test_mean_and_sum_reductions(tiny_model_dir):
    """Through the objective's own ``items_key`` (the count the loop sums): mean = every token's NLL
    over the trained tokens; sum = each conversation's summed NLL averaged over conversations; each
    conversation's log-probs from transformers' own forward of it alone."""
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    samples = samples_for(tok, multi_turn_records(4))
    b = collate(packing.unpacked(samples), tok.pad_token_id)
    policy = TokenLogProbs(model)
    mean, total = sft_objective("mean"), sft_objective("sum")
    mean_loss, _ = mean.loss(policy, b, b[mean.items_key])
    sum_loss, _ = total.loss(policy, b, b[total.items_key])
    nll, tokens = [], 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            trained = torch.tensor(s["labels_mask"][1:])
            lp = torch.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None])[:, 0]
            nll.append(-float(lp[trained].sum()))
            tokens += int(trained.sum())
    assert float(mean_loss) == pytest.approx(sum(nll) / tokens, rel=1e-5)
    assert float(sum_loss) == pytest.approx(sum(nll) / len(samples), rel=1e-5)


def test_gradient_accumulation_equivalence(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", multi_turn_records(24))
    kw = dict(max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant")
    a = sft(tmp_path, tiny_model_dir, data, "a", per_device_train_batch_size=8, gradient_accumulation_steps=1, **kw)
    b = sft(tmp_path, tiny_model_dir, data, "b", per_device_train_batch_size=2, gradient_accumulation_steps=4, **kw)
    assert max_diff(weights(a.output_dir), weights(b.output_dir)) <= 1e-5
    la = [json.loads(x)["loss"] for x in (a.output_dir / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-5)
    # with the sum reduction too
    c = sft(tmp_path, tiny_model_dir, data, "c", per_device_train_batch_size=8, loss_reduction="sum", **kw)
    d = sft(tmp_path, tiny_model_dir, data, "d", per_device_train_batch_size=2, gradient_accumulation_steps=4,
            loss_reduction="sum", **kw)
    assert max_diff(weights(c.output_dir), weights(d.output_dir)) <= 1e-5


def test_same_seed_same_run_and_every_parameter_moves(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", addition_records(40))
    a = sft(tmp_path, tiny_model_dir, data, "a", packing=True, seed=3)
    b = sft(tmp_path, tiny_model_dir, data, "b", packing=True, seed=3)
    c = sft(tmp_path, tiny_model_dir, data, "c", packing=True, seed=4)
    wa, wb, wc = weights(a.output_dir), weights(b.output_dir), weights(c.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert max_diff(wa, wc) > 0
    base = weights(tiny_model_dir)
    unmoved = [k for k in wa if torch.equal(wa[k], base[k])]
    assert unmoved == []


def test_learns_addition_and_answers_training_prompts(tmp_path, tiny_model_dir):
    from posttrain.inference.engine import SamplingParams, TransformersEngine

    recs = addition_records(60)
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    res = sft(tmp_path, tiny_model_dir, data, packing=True, max_steps=400, learning_rate=5e-3,
              lr_scheduler_type="cosine", warmup_ratio=0.05, logging_steps=10)
    losses = [json.loads(x)["loss"] for x in (res.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] > 1.0 and losses[-1] < 0.5 * losses[0]
    engine = TransformersEngine(load_model(str(res.output_dir)), load_tokenizer(str(res.output_dir)), batch_size=64)
    outs = engine.generate([r["messages"][:1] for r in recs], SamplingParams(max_new_tokens=4))
    right = sum(o.text.strip() == r["messages"][1]["content"] for o, r in zip(outs, recs))
    assert right == len(recs), [o.text for o in outs]
    assert all(o.finish_reason == "stop" for o in outs)


def test_outputs_manifest_and_rerun(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", addition_records(40))
    res = sft(tmp_path, tiny_model_dir, data, max_steps=4, save_steps=2, packing=True)
    out = res.output_dir
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == chat.TULU and model.config.vocab_size == len(tok)
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "sft" and m["config"]["max_steps"] == 4 and m["licenses"] == ["CC0-1.0"]
    assert m["model_license"] == "unknown"  # a model card without a license
    assert m["data"][0]["fingerprint"].startswith("sha256:") and m["data"][0]["records_used"] == 40
    assert m["data_stats"]["samples"] == 40 and 0 < m["data_stats"]["packing_efficiency"] <= 1
    assert m["metrics"]["step"] == 4 and m["metrics"]["loss"] > 0 and m["posttrain_version"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all("loss" in x for x in lines)
    assert (out / "checkpoints" / "checkpoint-2" / "config.json").is_file()
    # the same command again does nothing; a different config on the same output_dir is refused
    again = sft(tmp_path, tiny_model_dir, data, max_steps=4, save_steps=2, packing=True)
    assert again.skipped and again.metrics == m["metrics"]
    with pytest.raises(UserError, match="finished run with a different config"):
        sft(tmp_path, tiny_model_dir, data, max_steps=5, save_steps=2, packing=True)


def test_the_model_license_follows_the_lineage(tmp_path, tiny_model_dir):
    """A model card's license reaches the manifest of a model trained from it, and of one trained from that."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: gemma\n---\n")
    data = write_jsonl(tmp_path / "d.jsonl", addition_records(8))
    first = sft(tmp_path, base, data, name="first", max_steps=1)
    second = sft(tmp_path, first.output_dir, data, name="second", max_steps=1)
    for res in (first, second):
        assert json.loads((res.output_dir / "manifest.json").read_text())["model_license"] == "gemma"


def test_lora_trains_adapters_and_saves_a_merged_model(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", addition_records(40))
    heldout = disjoint_additions(tmp_path, addition_records(40))
    res = sft(tmp_path, tiny_model_dir, data, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
              learning_rate=1e-2, max_steps=6, packing=True, save_steps=3, eval_datasets=heldout, eval_steps=1)
    merged, base = weights(res.output_dir), weights(tiny_model_dir)
    assert set(merged) == set(base)  # a plain checkpoint, no adapter keys
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    assert (res.output_dir / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    losses = heldout_losses(res.output_dir)  # measured 5.65 falling every step to 5.28
    assert losses == sorted(losses, reverse=True) and losses[0] - losses[-1] > 0.3, losses


def test_gradient_checkpointing_gives_the_same_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", multi_turn_records(16))
    a = sft(tmp_path, tiny_model_dir, data, "a", max_steps=2)
    b = sft(tmp_path, tiny_model_dir, data, "b", max_steps=2, gradient_checkpointing=True)
    assert max_diff(weights(a.output_dir), weights(b.output_dir)) <= 1e-6


def test_eval_datasets_report_held_out_loss(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", addition_records(40))
    held = write_jsonl(tmp_path / "h.jsonl", addition_records(60)[40:])
    res = sft(tmp_path, tiny_model_dir, data, max_steps=6, eval_steps=3, eval_datasets=[{"path": str(held)}])
    evals = [json.loads(x) for x in (res.output_dir / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x]
    assert [e["step"] for e in evals] == [3, 6] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert res.metrics["eval/loss"] == evals[1]["eval/loss"]


def test_tensorboard_logging(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", addition_records(16))
    res = sft(tmp_path, tiny_model_dir, data, max_steps=3, report_to=["tensorboard"])
    events = list(res.output_dir.rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in res.output_dir.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
