"""Self-RAG: training records labelled by the rule and engine critics (hand-checked), passages masked
out of the loss, added reflection tokens, and the critique-guided segment score computed by hand with a
scripted engine."""

import json
import math

import pytest

from posttrain.inference.engine import Completion
from posttrain.rag import selfrag as sr
from posttrain.rag.selfrag_decoding import SelfRAG, normalized, support_score, utility_score


def test_rule_critic_records_by_hand(fact_index):
    records = [{"instruction": "In which country was Ana Lor born?", "answer": "Tivia",
                "output": "Ana Lor was born in Ropa. Ropa is a city in Tivia.",
                "support": ["Ana Lor was born in Ropa.", "Ropa is a city in Tivia."]},
               {"instruction": "What is 2 + 3?", "output": "2 + 3 = 5.", "answer": "5", "support": []}]
    out, stats = sr.build_records(records, fact_index, sr.RuleCritic(), k=3)  # all three: BM25 on 3 documents is crude
    ana, ropa = "Ana Lor\nAna Lor was born in Ropa. Ana Lor plays the harp.", \
        "Ropa\nRopa is a city in Tivia. The river Sul flows through Ropa."
    assert out[0]["messages"][1]["content"] == (
        f"[Retrieval]<paragraph>{ana}</paragraph>[Relevant]Ana Lor was born in Ropa.[Fully supported]"
        f"[Retrieval]<paragraph>{ropa}</paragraph>[Relevant]Ropa is a city in Tivia.[Fully supported][Utility:5]")
    assert out[1]["messages"] == [{"role": "user", "content": "What is 2 + 3?"},
                                  {"role": "assistant", "content": "[No Retrieval]2 + 3 = 5.[Utility:5]"}]
    assert stats == {"records": 2, "segments": 3, "no_retrieval": 1, "relevant": 2, "retrieval": 2,
                     "support_full": 2, "utility_5": 2}
    assert sr.strip_tokens(out[0]["messages"][1]["content"]) == "Ana Lor was born in Ropa. Ropa is a city in Tivia."
    # negatives: the record is written again with the best-ranked irrelevant passage in its first segment
    with_neg, stats = sr.build_records(records, fact_index, sr.RuleCritic(), k=3, negatives=1.0)
    assert [r["messages"][1]["content"] for r in with_neg[:1] + with_neg[2:]] == [r["messages"][1]["content"] for r in out]
    bo = "Bo Fen\nBo Fen makes kites. Bo Fen was born in Kell."
    assert with_neg[1]["messages"][1]["content"] == (
        f"[Retrieval]<paragraph>{bo}</paragraph>[Irrelevant]Ana Lor was born in Ropa."
        f"[Retrieval]<paragraph>{ropa}</paragraph>[Relevant]Ropa is a city in Tivia.[Fully supported][Utility:5]")
    assert stats["negative_records"] == 1 and stats["records"] == 3


class ScriptedEngine:
    """Replies chosen by what the prompt contains; next-token log-probs from a table."""

    def __init__(self, replies=None, tokenizer=None, table=None, completions=None):
        self.replies, self.tokenizer, self.table, self.completions = replies or {}, tokenizer, table, completions
        self.stop_ids = [0]
        self.prompts = []

    def generate(self, prompts, sampling):
        self.prompts += prompts
        if self.completions:
            return [self.completions(p) for p in prompts]
        out = []
        for p in prompts:
            text = p[0]["content"] if isinstance(p, list) else p
            out.append(Completion(next(r for key, r in self.replies.items() if key in text), [1], "stop"))
        return out

    def next_token_logprobs(self, prefixes, ids):
        return [self.table(p, ids) for p in prefixes]


def test_engine_critic_asks_in_batches_and_parses(fact_index):
    engine = ScriptedEngine({"Would evidence help": "Yes, it would.", "Answer Relevant or": "Irrelevant.",
                             "Is every claim": "Partially supported", "Answer with one number": "I'd say 4 of 5"})
    critic = sr.EngineCritic(engine)
    records = [{"instruction": "Where was Ana Lor born?", "output": "Ana Lor was born in Ropa."}]
    out, stats = sr.build_records(records, fact_index, critic, k=2)
    passage = "Ana Lor\nAna Lor was born in Ropa. Ana Lor plays the harp."
    assert out[0]["messages"][1]["content"] == f"[Retrieval]<paragraph>{passage}</paragraph>[Irrelevant]" \
                                               "Ana Lor was born in Ropa.[Utility:4]"
    assert len(engine.prompts) == 1 + 2 + 1  # one retrieval question, two passages, no support (irrelevant), utility
    assert critic.relevant([{"record": records[0], "passage": "p"}]) == [False]  # "Irrelevant." is not "relevant"
    engine.replies = {"Answer Relevant or": "hmm"}
    assert critic.relevant([{"record": records[0], "passage": "p"}]) == [False] and critic.unparsed["relevant"] == 1


def test_passages_are_never_trained(tiny_model_dir):
    from posttrain.data import chat
    from posttrain.models import add_tokens, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.resolve_template(tok, "chatml")[0])
    assert add_tokens(tok, list(sr.TOKENS)) == list(sr.TOKENS) and add_tokens(tok, list(sr.TOKENS)) == []
    reply = "[Retrieval]<paragraph>Ana Lor was born in Ropa.</paragraph>[Relevant]In Ropa.[Fully supported][Utility:5]"
    t = chat.tokenize_conversation(tok, [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": reply}],
                                   10_000)
    trained = tok.decode([i for i, m in zip(t.input_ids, t.labels_mask) if m])
    assert trained == "[Retrieval][Relevant]In Ropa.[Fully supported][Utility:5]<|im_end|>\n"
    untrained = tok.decode([i for i, m in zip(t.input_ids, t.labels_mask) if not m])
    assert "<paragraph>Ana Lor was born in Ropa.</paragraph>" in untrained
    for token in sr.TOKENS:  # each a single token that decodes as itself
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
        assert tok.decode(tok(token, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == token


def test_resize_embeddings_starts_new_rows_at_the_mean(tiny_model_dir):
    import torch

    from posttrain.models import load_model, resize_embeddings

    model = load_model(str(tiny_model_dir))
    old = model.get_input_embeddings().weight.detach().clone()
    resize_embeddings(model, old.shape[0] + 3)
    new = model.get_input_embeddings().weight.detach()
    assert torch.equal(new[:old.shape[0]], old)
    assert torch.allclose(new[old.shape[0]:], old.mean(0).expand(3, -1))
    head = model.get_output_embeddings().weight
    assert head.shape[0] == old.shape[0] + 3


class TinyTokenizer:
    """Reflection tokens plus whole words; id 0 is the end of turn."""

    def __init__(self):
        self.pieces = ["<eos>", *sr.TOKENS, "Ana", " was", " born", " in", " Ropa.", " Kell."]

    def get_vocab(self):
        return {p: i for i, p in enumerate(self.pieces)}

    def convert_tokens_to_ids(self, t):
        return self.pieces.index(t)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if i != 0)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return f"<user>{messages[0]['content']}<assistant>"


def test_segment_score_by_hand(fact_index):
    tok = TinyTokenizer()
    ids = tok.get_vocab()
    full, partial, none = (ids[t] for t in sr.SUPPORT.values())

    def completion(prefix):
        if "Ana Lor was born in Ropa." in prefix:  # the right passage
            pieces, lps = ["[Relevant]", "Ana", " was", " born", " in", " Ropa.", "[Fully supported]"], \
                [-0.1, -0.2, -0.1, -0.1, -0.2, -0.3, -0.05]
        else:
            pieces, lps = ["[Irrelevant]", "Ana", " was", " born", " in", " Kell.", "[No support / Contradictory]"], \
                [-1.0, -0.2, -0.1, -0.1, -0.2, -2.0, -0.5]
        token_ids = [ids[p] for p in pieces]
        return Completion("".join(pieces[:-1]), token_ids, "stop", 0, lps)

    rel = {True: [math.log(0.9), math.log(0.1)], False: [math.log(0.2), math.log(0.8)]}
    sup = {True: [math.log(0.7), math.log(0.2), math.log(0.1)], False: [math.log(0.1), math.log(0.3), math.log(0.6)]}
    use = {True: [math.log(p) for p in (0.05, 0.05, 0.1, 0.2, 0.6)], False: [math.log(p) for p in (0.5, 0.2, 0.1, 0.1, 0.1)]}

    def table(prefix, asked):
        right = "plays the harp.</paragraph>" in prefix
        if asked == [ids[sr.RELEVANT], ids[sr.IRRELEVANT]]:
            return rel[right]
        if asked == [full, partial, none]:
            return sup[right]
        if asked == [ids[t] for t in sr.UTILITY]:
            return use[right]
        if asked == [0]:  # end of turn
            return [math.log(0.01)]
        # the step decision [Retrieval], [No Retrieval], [Continue], utilities: after a segment, utility 5 wins
        return [math.log(0.5), math.log(0.3), math.log(0.01)] + ([math.log(0.01)] * 4 + [math.log(0.9)]
                                                                  if prefix.endswith("[Fully supported]")
                                                                  else [math.log(0.01)] * 5)

    engine = ScriptedEngine(tokenizer=tok, table=table, completions=completion)
    rag = SelfRAG(engine, fact_index, k=2, mode="always", beam=1, max_segments=2, w_rel=1.0, w_sup=1.0, w_use=0.5)
    [result] = rag.answer(["Where was Ana Lor born?"])
    right = (math.exp(sum([-0.1, -0.2, -0.1, -0.1, -0.2, -0.3, -0.05]) / 7) + 0.9 + (0.7 + 0.5 * 0.2)
             + 0.5 * (-0.05 - 0.025 + 0 + 0.1 + 0.6))
    wrong = (math.exp(sum([-1.0, -0.2, -0.1, -0.1, -0.2, -2.0, -0.5]) / 7) + 0.2 + (0.1 + 0.5 * 0.3)
             + 0.5 * (-0.5 - 0.1 + 0 + 0.05 + 0.1))
    assert right > wrong
    assert result["score"] == pytest.approx(right, rel=1e-12)
    assert result["text"] == "Ana was born in Ropa."
    assert [p["id"] for p in result["passages"]] == [0] and result["retrieved"]
    assert result["raw"].endswith("[Relevant]Ana was born in Ropa.[Fully supported][Utility:5]")
    assert normalized([math.log(2), math.log(6)]) == pytest.approx([0.25, 0.75])
    assert support_score(0.7, 0.2, 0.1) == pytest.approx(0.8)
    assert utility_score([0, 0, 0, 0, 1]) == 1.0 and utility_score([1, 0, 0, 0, 1]) == 0.0


def test_sft_with_reflection_tokens_saves_a_grown_vocabulary_and_masks_passages(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import SFTConfig
    from posttrain.config_io import load_config
    from posttrain.train.sft import run_sft

    reply = "[Retrieval]<paragraph>Ana Lor was born in Ropa.</paragraph>[Relevant]In Ropa.[Fully supported][Utility:5]"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Where was Ana Lor born?"},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    base = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"), "chat_template": "chatml",
            "datasets": [{"path": str(data), "license": "CC0-1.0"}], "max_seq_length": 128, "add_tokens": ["selfrag"],
            "per_device_train_batch_size": 1, "learning_rate": 1e-3, "max_steps": 2, "save_steps": 0}
    res = run_sft(load_config(SFTConfig, base=base))
    tok = AutoTokenizer.from_pretrained(res.output_dir)
    model = AutoModelForCausalLM.from_pretrained(res.output_dir)
    before = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == len(before) + len(sr.TOKENS) == model.config.vocab_size
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in sr.TOKENS)
    m = json.loads((res.output_dir / "manifest.json").read_text())
    trained = m["data_stats"]["trained_tokens"]
    # trained: the reply without its passage, and the end of turn
    expected = len(tok("[Retrieval][Relevant]In Ropa.[Fully supported][Utility:5]<|im_end|>\n",
                       add_special_tokens=False)["input_ids"])
    assert trained == expected
