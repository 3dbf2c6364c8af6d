"""GSM8K: grade-school math word problems, scored by the ``gsm8k`` verifier (the final number).

``gsm8k``: zero-shot chat with chain of thought (the instruction asks for the reasoning, then the
answer after ``####``). ``gsm8k_fewshot``: the same, after 4 worked examples given as earlier chat
turns (the chain-of-thought exemplars of Wei et al., 2022).
"""

from __future__ import annotations

from posttrain.data.adapters import GSM8K_INSTRUCTION as INSTRUCTION
from posttrain.data.adapters import gsm8k_final_answer
from posttrain.eval.tasks.base import Task, field_of
from posttrain.rewards import gsm8k as verifier

EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6.\n#### 6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.\n#### 5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39.\n#### 39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.\n#### 8"),
]


def instance(raw: dict, where: str, shots: int = 0) -> dict:
    question = field_of(raw, "question", where)
    turns = []
    for q, a in EXEMPLARS[:shots]:
        turns += [{"role": "user", "content": q + INSTRUCTION}, {"role": "assistant", "content": a}]
    return {"id": raw.get("id"), "prompt": turns + [{"role": "user", "content": question + INSTRUCTION}],
            "ground_truth": gsm8k_final_answer(field_of(raw, "answer", where)), "text": question}


def score(output: str, inst: dict) -> dict:
    return {"score": verifier.score(output, inst["ground_truth"]), "extracted": verifier.extract(output)}


ZERO_SHOT = Task("gsm8k", ("openai/gsm8k", "main", "test"), instance, score, max_new_tokens=512,
                 description="GSM8K test, zero-shot chain of thought, exact final number")
FEW_SHOT = Task("gsm8k_fewshot", ("openai/gsm8k", "main", "test"), lambda r, w: instance(r, w, shots=4), score,
                max_new_tokens=512, description="GSM8K test, 4-shot chain of thought as chat turns")
