"""``search``: queries against a ``posttrain data index`` datastore (BM25, dense or hybrid).

The tool ``search(query, k)`` returns the top ``k`` passages (at most ``max_k``), one per block:
``[<document id>#<chunk>] <title>`` and the passage's text cut to ``max_passage_chars``. Ids let the model (and
a ``rag_facts``-style verifier) cite what it read. The index is opened once and shared by every episode
(searching does not change it).
"""

from __future__ import annotations

import threading

from posttrain.envs.base import ToolEnv, ToolError
from posttrain.errors import UserError
from posttrain.rag.index import Retriever

SEARCH_TOOL = {"type": "function", "function": {
    "name": "search",
    "description": "Search the document collection; returns the best passages with their ids.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "what to look for"},
        "k": {"type": "integer", "description": "how many passages (default 3)"}}, "required": ["query"]}}}


class SearchEnv(ToolEnv):
    name = "search"
    tools = [SEARCH_TOOL]
    system_prompt = "You can look facts up with the search tool; answer from what it returns."

    def __init__(self, index: str | None = None, mode: str | None = None, k: int = 3, max_k: int = 10,
                 max_passage_chars: int = 600, **shaping):
        super().__init__(**shaping)
        if not index:
            raise UserError("env search: give the index directory (env_args: {index: DIR}, from `posttrain data index`)")
        self.retriever = Retriever(index)
        self.lock = threading.Lock()  # the retriever reads passages through one file handle
        self.mode, self.k, self.max_k, self.max_passage_chars = mode, k, max_k, max_passage_chars

    def call(self, state, name: str, arguments: dict) -> str:
        query, k = arguments.get("query"), arguments.get("k", self.k)
        if not isinstance(query, str) or not query.strip():
            raise ToolError('search needs a non-empty string argument "query"')
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ToolError('"k" must be a positive integer')
        with self.lock:
            hits = self.retriever.search(query, min(k, self.max_k), self.mode)
        if not hits:
            return "(no passage matches)"
        return "\n\n".join(f"[{h['doc_id']}#{h['chunk']}] {h.get('title') or ''}".rstrip() + "\n" + h["text"][:self.max_passage_chars]
                           for h in hits)
