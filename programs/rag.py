"""`rag`: answers questions about a small document corpus and cites its sources.

The BM25 index (bm25s) is built when the program is built, which is at log
time. `save_files` writes it into the model artifact with bm25s's own save
(JSON and NumPy arrays, no pickle) beside the passages as JSON, and
`from_files` builds the program from those files when it is served: no
rebuild, no corpus and no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import dspy

CORPUS = Path(__file__).resolve().parent / "data" / "rag" / "corpus"
TOP_K = 3


def corpus_passages(corpus: Path) -> list[dict[str, str]]:
    """One passage per paragraph of every Markdown file, with its file and heading."""
    passages = []
    for path in sorted(corpus.glob("*.md")):
        title = path.stem
        for block in path.read_text().split("\n\n"):
            text = " ".join(block.split())
            if text.startswith("# "):
                title = text[2:]
            elif text:
                passages.append({"source": path.name, "title": title, "text": text})
    if not passages:
        raise ValueError(f"no passages under {corpus}")
    return passages


class Retriever:
    """A BM25 index over passages: built from them, or loaded from the files `save` wrote."""

    def __init__(self, passages: list[dict[str, str]], index=None) -> None:
        import bm25s

        self.passages = passages
        if index is None:
            index = bm25s.BM25()
            index.index(self._tokens([p["text"] for p in passages]), show_progress=False)
        self.index = index

    def save(self, folder: Path) -> None:
        self.index.save(str(folder / "bm25"))  # JSON and .npy files, saved without pickle
        (folder / "passages.json").write_text(json.dumps(self.passages, indent=1))

    @classmethod
    def load(cls, folder: Path) -> Retriever:
        import bm25s

        index = bm25s.BM25.load(str(folder / "bm25"), allow_pickle=False)
        return cls(json.loads((folder / "passages.json").read_text()), index)

    @staticmethod
    def _tokens(texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def search(self, query: str, k: int = TOP_K) -> list[dict[str, str]]:
        tokens = self._tokens([query])
        if not tokens[0]:
            return self.passages[:k]
        k = min(k, len(self.passages))
        ids, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        return [self.passages[int(i)] for i, s in zip(ids[0], scores[0], strict=True) if s > 0] or self.passages[:1]


class AnswerFromPassages(dspy.Signature):
    """Answer the question using only the numbered passages. List the numbers of the passages you used."""

    passages: list[str] = dspy.InputField()
    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField(desc="the conversation so far")
    answer: str = dspy.OutputField(desc="a short answer")
    cited: list[int] = dspy.OutputField(desc="numbers of the passages used")


class RAG(dspy.Module):
    def __init__(self, retriever: Retriever, k: int = TOP_K) -> None:
        super().__init__()
        self.retriever = retriever
        self.k = k
        self.generate = dspy.Predict(AnswerFromPassages)

    # The index travels as files of the model (mlflow-dspy calls these at log time and when serving).
    def save_files(self, folder: Path) -> None:
        self.retriever.save(folder)
        (folder / "rag.json").write_text(json.dumps({"k": self.k}))

    @classmethod
    def from_files(cls, folder: Path) -> RAG:
        return cls(Retriever.load(folder), **json.loads((folder / "rag.json").read_text()))

    def _cite(self, hits: list[dict], prediction: dspy.Prediction) -> dspy.Prediction:
        chosen = [i for i in dict.fromkeys(prediction.cited or []) if isinstance(i, int) and 1 <= i <= len(hits)]
        # A model that names no valid passage still answered from what it was
        # given: cite the best match rather than nothing.
        chosen = chosen or [1]
        sources = [hits[i - 1] for i in chosen]
        notes = "; ".join(f"[{n}] {s['source']} ({s['title']})" for n, s in enumerate(sources, 1))
        return dspy.Prediction(
            answer=f"{prediction.answer.strip()}\n\nSources: {notes}",
            citations=[{"source": s["source"], "title": s["title"], "text": s["text"]} for s in sources],
        )

    def _numbered(self, hits: list[dict]) -> list[str]:
        return [f"[{n}] {hit['text']}" for n, hit in enumerate(hits, 1)]

    def forward(self, question: str, history: dspy.History | None = None) -> dspy.Prediction:
        hits = self.retriever.search(question, self.k)
        history = history or dspy.History(messages=[])
        return self._cite(hits, self.generate(passages=self._numbered(hits), question=question, history=history))

    async def aforward(self, question: str, history: dspy.History | None = None) -> dspy.Prediction:
        hits = self.retriever.search(question, self.k)
        history = history or dspy.History(messages=[])
        return self._cite(hits, await self.generate.acall(passages=self._numbered(hits), question=question,
                                                          history=history))


def build() -> dspy.Module:
    return RAG(Retriever(corpus_passages(CORPUS)))
