"""Evaluation data: a registry of named data sets, plus any JSONL/text file or Hugging Face data set.

A named data set (:data:`DATASETS`) is a file under the shared data root (``$KVKEEP_DATA``, else
``<repo>/../shared/data``) with a field mapping, a default task and a prompt template; adding one is one
:class:`DatasetSpec` entry.  Every loader yields :class:`Sample` objects.  Bad input (missing file,
malformed JSONL line, missing field) raises a one-line ``ValueError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from .sample import Sample

__all__ = [
    "DATASETS",
    "DEFAULT_TEMPLATE",
    "Dataset",
    "DatasetSpec",
    "SYNTHETIC_DEFAULTS",
    "Sample",
    "data_root",
    "load_dataset",
    "read_jsonl",
]

#: Template of a file given by path (``{doc}`` is the document, ``{query}`` the query when there is one).
DEFAULT_TEMPLATE = "Summarize the following text.\n\n{doc}"


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set.

    Args:
        path: file (or glob, one sample per file for text) relative to the shared data root.
        task: the task it is evaluated with by default.
        doc, refs, id: field names of the document, the references and the sample id (JSONL; no id field:
            the 0-based line index).
        template: the prompt, with ``{doc}`` (and ``{query}``); any instruction goes here.
        keep: further fields copied into :attr:`Sample.extra`.
        loader: ``loader(path, spec) -> Iterator[Sample]`` for formats the field mapping cannot express.
        synthetic: the kind of generated samples (:data:`kvkeep.eval.synthetic.KINDS`); ``path`` is then the
            prose of its haystack, if it needs one.
    """

    path: str
    task: str
    doc: str = "article"
    refs: tuple[str, ...] = ("reference",)
    id: str | None = None
    template: str = "{doc}"
    keep: tuple[str, ...] = ()
    loader: Callable[[Path, DatasetSpec], Iterator[Sample]] | None = None
    synthetic: str | None = None


@dataclass
class Dataset:
    """Loaded samples with the data set's name (the label rows carry), default task and prompt template."""

    name: str
    task: str
    template: str
    samples: list[Sample]


# -- reading ------------------------------------------------------------------------------------------
def data_root() -> Path:
    """``$KVKEEP_DATA``, else ``shared/data`` beside the repository, else ``../shared/data`` from the cwd."""
    env = os.environ.get("KVKEEP_DATA")
    if env:
        return Path(env).expanduser()
    beside_repo = Path(__file__).resolve().parents[3].parent / "shared" / "data"  # src/kvkeep/eval/data.py
    return beside_repo if beside_repo.is_dir() else Path.cwd().parent / "shared" / "data"


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The JSON objects of a JSONL file (blank lines skipped); ``ValueError`` naming the file and line if malformed."""
    return (obj for _, obj in numbered_jsonl(Path(path)))


def numbered_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(1-based line number, object)`` for each non-blank line of a JSONL file; ``ValueError`` if malformed."""
    _check_file(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: malformed JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def _get(obj: dict, key: str, where: str):
    if key not in obj:
        raise ValueError(f"{where}: no field {key!r} (fields: {', '.join(sorted(obj))}); see --doc-field/--ref-field")
    return obj[key]


def _sample(obj: dict, spec: DatasetSpec, index: int, where: str) -> Sample:
    """A sample from one record through the spec's field mapping."""
    refs = []
    for name in spec.refs:
        value = _get(obj, name, where)
        refs.extend(value if isinstance(value, list) else [value])
    sample_id = str(obj[spec.id]) if spec.id and spec.id in obj else str(index)
    extra = {k: obj[k] for k in spec.keep if k in obj}
    return Sample(sample_id, str(_get(obj, spec.doc, where)), [str(r) for r in refs], extra=extra)


def _records(path: Path, spec: DatasetSpec) -> Iterator[Sample]:
    """Samples from a JSONL file."""
    for index, (number, obj) in enumerate(numbered_jsonl(path)):
        yield _sample(obj, spec, index, f"{path}, line {number}")


def _texts(path: Path, spec: DatasetSpec) -> Iterator[Sample]:
    """One sample per text file (``path`` may be a glob); the id is the file name without suffix."""
    files = sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else [path]
    if not files:
        raise ValueError(f"data file not found: {path}")
    for file in files:
        _check_file(file)
        yield Sample(file.stem, file.read_text(encoding="utf-8"))


def _qmsum(path: Path, spec: DatasetSpec) -> Iterator[Sample]:
    """QMSum: one sample per general/specific query; the document is the transcript as "speaker: content" lines."""
    for index, (number, meeting) in enumerate(numbered_jsonl(path)):
        where = f"{path}, line {number}"
        transcript = "\n".join(
            f"{turn['speaker']}: {turn['content']}" for turn in _get(meeting, "meeting_transcripts", where)
        )
        for kind in ("general", "specific"):
            for j, item in enumerate(meeting.get(f"{kind}_query_list", [])):
                yield Sample(f"{index}-{kind}-{j}", transcript, [item["answer"]], query=item["query"])


_CNNDM = "Summarize the following news article in 3 sentences.\n\n{doc}"
_CNNDM_AFTER = "{doc}\n\nSummarize the above news article in 3 sentences."

#: Named data sets; paths are relative to :func:`data_root`.
DATASETS: dict[str, DatasetSpec] = {
    # ROUGE against the original highlights; the 11 human references stay in Sample.extra["references"].
    "cnndm": DatasetSpec(
        "summarization/summeval_cnndm_100.jsonl", "summarization", id="id", template=_CNNDM, keep=("references",)
    ),
    # The same articles scored against their 11 human references (max over references).
    "cnndm-human": DatasetSpec(
        "summarization/summeval_cnndm_100.jsonl", "summarization", refs=("references",), id="id", template=_CNNDM
    ),
    # The same articles and references with the instruction after the article: a policy that keeps the most
    # recent tokens then keeps the instruction.
    "cnndm-after": DatasetSpec(
        "summarization/summeval_cnndm_100.jsonl", "summarization", id="id", template=_CNNDM_AFTER, keep=("references",)
    ),
    "cnndm-realsumm": DatasetSpec("summarization/realsumm_cnndm_100.jsonl", "summarization", id="id", template=_CNNDM),
    # H2O's own prompt ("###\nArticle: ...\n\nSummarize the above article in 1 sentence.\n"), used as is.
    "xsum": DatasetSpec("summarization/h2o_xsum_0shot.jsonl", "summarization", refs=("summary_gt",)),
    "dialogsum": DatasetSpec(
        "dialogue/dialogsum.test.jsonl",
        "summarization",
        doc="dialogue",
        refs=("summary1", "summary2", "summary3"),
        id="fname",
        template="Summarize the following dialogue.\n\n{doc}",
    ),
    # Transcripts run to 22k words: the task truncates the document to --max-prompt-tokens (row: truncated).
    "qmsum": DatasetSpec(
        "long/qmsum_test.jsonl",
        "summarization",
        template="Read the following meeting transcript and answer the query.\n\n{doc}\n\nQuery: {query}",
        loader=_qmsum,
    ),
    "books": DatasetSpec("books/austen_*.txt", "perplexity", loader=_texts),
    "wikitext2": DatasetSpec("lm/wikitext2_test.txt", "perplexity", loader=_texts),
    # Synthetic long-context tasks, generated with the model's tokenizer (kvkeep.eval.synthetic): --context,
    # --depths and --per-cell choose the samples.
    "passkey": DatasetSpec("", "retrieval", synthetic="passkey"),
    "niah": DatasetSpec("books/austen_*.txt", "retrieval", synthetic="niah_single"),
    "niah-multikey": DatasetSpec("books/austen_*.txt", "retrieval", synthetic="niah_multikey"),
    "niah-multivalue": DatasetSpec("books/austen_*.txt", "retrieval", synthetic="niah_multivalue"),
    "vt": DatasetSpec("", "retrieval", synthetic="vt"),
    "cwe": DatasetSpec("books/austen_*.txt", "retrieval", synthetic="cwe"),
}
#: Synthetic samples by default: every context SmolLM2 holds, five depths, one sample per cell.
SYNTHETIC_DEFAULTS = {"contexts": (1024, 2048, 4096, 8192), "depths": (0.0, 0.25, 0.5, 0.75, 1.0), "per_cell": 1}

_FILE_SUFFIXES = (".jsonl", ".json", ".txt")


def _hub(name: str, split: str, spec: DatasetSpec, limit: int | None) -> Iterator[Sample]:
    """Samples of a Hugging Face data set ``NAME[:CONFIG]`` (needs the ``datasets`` package and the hub)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"--data {name!r} is neither a data set name ({', '.join(DATASETS)}) nor an existing file; "
            "loading it from the Hugging Face hub needs the 'datasets' package (pip install datasets)"
        ) from None
    repo, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(repo, config or None, split=split, streaming=True)
    except Exception as err:  # the hub raises many kinds of errors; report one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load Hugging Face data set {name!r} (split {split!r}): {first}") from None
    for index, obj in enumerate(islice(rows, limit)):
        yield _sample(obj, spec, index, f"{name}: record {index + 1}")


def load_dataset(
    data: str,
    *,
    limit: int | None = None,
    doc_field: str | None = None,
    ref_field: str | None = None,
    id_field: str | None = None,
    split: str = "test",
    contexts: list[int] | None = None,
    depths: list[float] | None = None,
    per_cell: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a named data set, a JSONL/text file or a Hugging Face data set (``NAME[:CONFIG]``).

    ``doc_field``/``ref_field`` (comma-separated for several references)/``id_field`` override the field
    mapping of a file or hub data set (defaults ``article``, ``reference``, ``id``).  A ``.txt`` file is one
    sample for the perplexity task; anything else defaults to summarization.  ``limit``: the first N samples.
    A synthetic data set is generated: ``per_cell`` samples per context length (tokens) and needle depth (0 to
    1), drawn with ``seed`` (defaults: :data:`SYNTHETIC_DEFAULTS`).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    synthetic = DATASETS[data].synthetic if data in DATASETS else None
    if synthetic:
        return _synthetic(data, limit, contexts, depths, per_cell, seed)
    if contexts or depths or per_cell:
        names = ", ".join(name for name, spec in DATASETS.items() if spec.synthetic)
        raise ValueError(f"--context, --depths and --per-cell apply to the synthetic data sets ({names}), not {data}")
    if data in DATASETS:
        spec = DATASETS[data]
        path = data_root() / spec.path
        if spec.loader is None:
            _check_file(path)
    else:
        mapping = {}
        if doc_field:
            mapping["doc"] = doc_field
        if ref_field:
            mapping["refs"] = tuple(f.strip() for f in ref_field.split(",") if f.strip())
        mapping["id"] = id_field or "id"
        path = Path(data).expanduser()
        if path.suffix == ".txt":
            spec = DatasetSpec(str(path), "perplexity", loader=_texts)
        else:
            spec = DatasetSpec(str(path), "summarization", template=DEFAULT_TEMPLATE, **mapping)
        if not path.exists():
            if path.suffix in _FILE_SUFFIXES or data.startswith((".", "/", "~")):
                raise ValueError(f"data file not found: {path}")
            samples = list(_hub(data, split, spec, limit))
            return Dataset(data, spec.task, spec.template, samples)
    loader = spec.loader or _records
    samples = list(islice(loader(path, spec), limit))
    if not samples:
        raise ValueError(f"no samples in {path}")
    return Dataset(data, spec.task, spec.template, samples)


def _synthetic(data: str, limit, contexts, depths, per_cell, seed: int) -> Dataset:
    from .synthetic import synthetic_samples

    spec = DATASETS[data]
    defaults = SYNTHETIC_DEFAULTS
    path = data_root() / spec.path if spec.path else None
    samples = synthetic_samples(
        spec.synthetic,
        list(contexts or defaults["contexts"]),
        list(depths if depths is not None else defaults["depths"]),
        per_cell or defaults["per_cell"],
        seed,
        path,
    )
    return Dataset(data, spec.task, "", samples[:limit])
