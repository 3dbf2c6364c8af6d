"""MATH-style answers, compared by equivalence through ``math-verify``.

Extraction: the content of the last ``\\boxed{...}``; else what follows the last "Final Answer:"
(or "The final answer is"); else nothing (score 0.0). The extracted answer and the ground truth are
parsed by ``math_verify.parse`` (LaTeX and plain expressions) and compared by
``math_verify.verify`` (symbolic and numeric equivalence: ``\\frac{1}{2}`` = ``0.5`` = ``1/2``).

math-verify bounds its own parsing and checking time with ``signal.alarm``, which works only in
the main thread; from any other thread the checks run without that timeout (``parsing_timeout``
and ``timeout_seconds`` set to None) instead of failing.
"""

from __future__ import annotations

import threading

from posttrain.rewards.extract import final_answer_line, last_boxed

TIMEOUT_SECONDS = 5


def extract(response: str) -> str | None:
    """The last ``\\boxed{}``'s content (else the "Final Answer:" line), without surrounding spaces
    (``\\text{ degrees} }`` would otherwise parse differently from ``\\text{ degrees}}``)."""
    boxed = last_boxed(response)
    found = boxed if boxed is not None else final_answer_line(response)
    return found.strip() if found is not None else None


def _parse(text: str, timeout):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(f"${text}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=timeout)


def equivalent(pred: str, gold: str) -> bool:
    from math_verify import verify

    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    parsed_gold, parsed_pred = _parse(gold, timeout), _parse(pred, timeout)
    if not parsed_gold or not parsed_pred:
        return pred.strip() == gold.strip()
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=timeout))


def score(response: str, ground_truth) -> float:
    pred = extract(response)
    if pred is None:
        return 0.0
    try:
        return 1.0 if equivalent(pred, str(ground_truth)) else 0.0
    except Exception:  # math-verify raises on inputs it cannot handle (and on its own timeouts)
        return 0.0
