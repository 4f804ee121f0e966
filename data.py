"""The data files: the question sets (TriviaQA from the Hugging Face hub, the tiny world's from world.py, or a
local JSONL of {"question": ..., "answers": [...]}; every question is a dict with at least those two fields),
the other phrasings of a question (the file's, or the model's own), the JSONL logs the scripts write, and
write_atomic, how every result file is written.
"""

import hashlib
import json
import os
import re

import calib
from cli import UserError
from model import TINY
from parallel import gather
from rollout import generate


TRIVIAQA = "mandarjoshi/trivia_qa"


def load_questions(dataset, split):
    """A list of {"question", "answers", ...}: `dataset` is "triviaqa" or "tiny" (the embedded world of world.py),
    split "train" or "validation"; or a JSONL path (the split is then ignored). Fields beyond question and answers
    are kept."""
    if dataset == "triviaqa":
        return load_triviaqa(split)
    if dataset == "tiny":
        return read_jsonl(os.path.join(TINY, f"{split}.jsonl"))
    if not os.path.isfile(dataset):
        raise UserError(f"dataset not found: {dataset!r} is neither 'triviaqa', 'tiny' nor a JSONL file")
    return read_jsonl(dataset)


def fingerprint(dataset):
    """The SHA-256 of a question file's content (tiny's training questions for "tiny"); None for TriviaQA, which
    the hub versions."""
    if dataset == "triviaqa" or (dataset != "tiny" and not os.path.isfile(dataset)):   # load_questions says why
        return None
    with open(os.path.join(TINY, "train.jsonl") if dataset == "tiny" else dataset, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def has_paraphrases(question, k):
    """Whether a question carries at least k `paraphrases`, a list of non-empty texts."""
    ways = question.get("paraphrases")
    return isinstance(ways, list) and len(ways) >= k and all(isinstance(w, str) and w.strip() for w in ways)


def phrasings(question, k):
    """k ways to ask a question: the question itself, then its `paraphrases` (world.py's question files carry
    three; train.py --paraphrase-source self writes them for any other file). A question with fewer than k
    phrasings (a model-written paraphrase dropped) asks the ones it has in turn, so that each of the k slots
    exists."""
    ways = [question["question"]] + list(question.get("paraphrases", []))
    return [ways[j % len(ways)] for j in range(k)]


def self_paraphrases(model, tok, questions, k, batch=64):
    """k - 1 other phrasings of each question, written by the model before any training (its LoRA is still
    zero): its greedy answer to each of calib.PARAPHRASE_PROMPTS. One that is empty, or the question again (or
    an earlier paraphrase) after normalization, or not a question (no "?": an answer, say), is dropped.
    Returns ({question: [paraphrases]}, dropped)."""
    texts = list(dict.fromkeys(q["question"] for q in questions))
    prompts = [tok.chat(calib.paraphrase_messages(text, j)) for text in texts for j in range(k - 1)]
    out = [c for i in range(0, len(prompts), batch)
           for c in generate(model, tok, prompts[i:i + batch], max_new_tokens=64, temperature=0)]
    result, dropped = {}, 0
    for n, text in enumerate(texts):
        kept = []
        for c in out[n * (k - 1):(n + 1) * (k - 1)]:
            lines = c.text.strip().splitlines()
            candidate = lines[0].removeprefix("Question:").strip() if lines else ""
            if (not candidate.endswith("?") or not calib.normalize(candidate)
                    or calib.normalize(candidate) in map(calib.normalize, [text, *kept])):
                dropped += 1
            else:
                kept.append(candidate)
        result[text] = kept
    return result, dropped


def with_paraphrases(model, tok, pool, args, rank, resuming):
    """The pool with the phrasings --paraphrases asks for: the file's (K - 1 of them at least), or
    (--paraphrase-source self) the model's, written by rank 0 at the run's start into OUT/paraphrases.json and
    read back from it on resume; rank 0 hands them to every process."""
    if args.paraphrase_source == "file":
        short = next((q for q in pool if not has_paraphrases(q, args.paraphrases - 1)), None)
        if short is not None:
            raise UserError(f"--paraphrases {args.paraphrases}: {short['question']!r} of {args.dataset} has no list of "
                            f"{args.paraphrases - 1} `paraphrases`; pass --paraphrase-source self to have the model "
                            "write them")
        return pool
    cache = os.path.join(args.out, "paraphrases.json")
    if rank == 0 and resuming and os.path.exists(cache):
        written = read_json_object(cache)
        bad = next((k for k, v in written.items() if not (isinstance(v, list) and all(
            isinstance(w, str) and w.strip() and not CONTROL_TOKEN.search(w) for w in v))), None)
        if bad is not None:
            raise UserError(f"{cache}: the paraphrases of {bad!r} are not a list of texts; remove the file, and the "
                            "model writes them again")
    elif rank == 0:
        written, dropped = self_paraphrases(model, tok, pool, args.paraphrases)
        short = sum(len(v) < args.paraphrases - 1 for v in written.values())
        print(f"paraphrases: the model wrote {sum(map(len, written.values()))} for {len(written)} questions; "
              f"{dropped} dropped (empty, not a question, or the question again); {short} questions have fewer "
              f"than {args.paraphrases - 1} and ask their phrasings in turn", flush=True)
    written = gather(written if rank == 0 else None)[0]   # every process asks the same ways
    missing = [q["question"] for q in pool if q["question"] not in written]
    if missing:
        raise UserError(f"{cache} has no paraphrases of {missing[0]!r}: it belongs to another run; remove it, and "
                        "the model writes them again")
    return [{**q, "paraphrases": written[q["question"]]} for q in pool]


def read_jsonl(path):
    """The questions of a JSONL file: one object per line, UTF-8 (with or without a byte-order mark) or UTF-16
    with one (what some Windows editors write). Anything else is one line naming the file and what is wrong."""
    with open(path, "rb") as f:
        data = f.read()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    if encoding != "utf-16" and b"\x00" in data[:1000]:   # every other byte 0: UTF-16 that lost its mark
        raise UserError(f"{path} looks like UTF-16 without a byte-order mark (it holds NUL bytes); save it as UTF-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); save it as "
                        "UTF-8") from None
    questions = []
    # lines end in \n, \r\n or a lone \r (old Mac files); not splitlines: U+2028 may sit inside a string
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path}, line {number}: not JSON ({str(e).split(':')[0]})") from None
        if not (isinstance(item, dict) and isinstance(item.get("question"), str) and item["question"].strip()
                and isinstance(item.get("answers"), list) and item["answers"]
                and all(isinstance(a, str) for a in item["answers"])):
            raise UserError(f"{path}, line {number}: expected a JSON object "
                            '{"question": "...", "answers": ["...", ...]} (a question and a non-empty list of '
                            "answers, all text)")
        problem = question_problem(item)
        if problem:
            raise UserError(f"{path}, line {number}: {problem}")
        questions.append(item)   # other fields (the tiny world's kind, fame) are kept for eval.py --group-by
    return questions


def is_utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


CONTROL_TOKEN = re.compile(r"<\|[^|<>\s]*\|>")   # the chat template's own tokens: <|im_start|>, <|im_end|>, ...


def question_problem(item):
    """What is wrong with a question of a file, or None: an answer that is blank or normalizes to nothing would
    score every answer wrong, or "?" right; a chat control token would become a real token and forge a turn of
    the conversation; a paraphrase must be another text of the question."""
    texts = [item["question"]] + (item["paraphrases"] if isinstance(item.get("paraphrases"), list) else [])
    broken = next((t for t in texts + item["answers"] if isinstance(t, str) and not is_utf8(t)), None)
    if broken is not None:   # "\ud800" is valid JSON and no text: a tokenizer or a JSON writer fails on it later
        return f"{broken[:40]!r} holds a lone surrogate (an escape like \\ud800 that encodes no character)"
    empty = [a for a in item["answers"] if not calib.normalize(a)]
    if empty:
        return (f"the answer {empty[0]!r} is blank once normalized (case, punctuation and articles are ignored); "
                "remove it or write the answer out")
    token = next((m.group() for t in texts if isinstance(t, str) for m in CONTROL_TOKEN.finditer(t)), None)
    if token:
        return f"the question holds the chat control token {token}, which would forge a turn; remove it"
    if "paraphrases" in item:
        ways = item["paraphrases"]
        if not (isinstance(ways, list) and all(isinstance(w, str) and w.strip() for w in ways)):
            return "`paraphrases` must be a list of texts, none blank"
        same = [w for w in ways if calib.normalize(w) == calib.normalize(item["question"])]
        if same:
            return f"the paraphrase {same[0]!r} is the question again; a paraphrase asks it another way"
    return None


def load_triviaqa(split):
    """TriviaQA rc.nocontext from the hub's parquet files; answers = value + aliases; one row per question_id
    (rc repeats some questions)."""
    from huggingface_hub import snapshot_download
    try:
        path = snapshot_download(TRIVIAQA, repo_type="dataset", allow_patterns=[f"rc.nocontext/{split}-*.parquet"])
    except Exception as e:
        raise UserError(f"cannot get TriviaQA ({TRIVIAQA}) from the Hugging Face hub: it is unreachable and not "
                        f"cached ({type(e).__name__}); pass a local JSONL with --dataset, or run the embedded demo, "
                        "which needs no hub: --model tiny --dataset tiny") from None
    return read_triviaqa_parquet(sorted(
        os.path.join(path, "rc.nocontext", f) for f in os.listdir(os.path.join(path, "rc.nocontext"))
        if f.startswith(split + "-")))


def read_triviaqa_parquet(files):
    import pyarrow.parquet as pq
    questions, seen = [], set()
    for file in files:
        table = pq.read_table(file, columns=["question", "question_id", "answer"]).to_pylist()
        for row in table:
            if row["question_id"] in seen:
                continue
            seen.add(row["question_id"])
            answers = [row["answer"]["value"]] + [a for a in row["answer"]["aliases"] if a != row["answer"]["value"]]
            questions.append({"question": row["question"], "answers": answers})
    if not questions:
        raise UserError(f"no TriviaQA questions in {files}")
    return questions


def read_records(path):
    """The rows of a JSONL file train.py or eval.py wrote (metrics.jsonl, responses-*.jsonl). A last line torn by
    a crash in the middle of a write is left out; any other line that is not JSON is an error."""
    if not os.path.isfile(path):
        raise UserError(f"not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise UserError(f"{path}, line {number} is not JSON; is it a file train.py or eval.py wrote? Remove "
                                "that line, or the file") from None
    return records


def read_json_object(path):
    """A JSON object that train.py wrote (paraphrases.json); one line naming the file when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); remove it to have it written again") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} should hold a JSON object; remove it to have it written again")
    return value


def write_atomic(path, data):
    """Write to a temporary file, flush it to disk, then rename it over `path` and flush the directory entry:
    a crash or a power loss leaves the old file or the new one, never half of one or an empty one. The
    temporary file is made new beside `path` (O_EXCL: never one that is there already; O_NOFOLLOW: never through
    a link someone planted), and a `path` that is a link is refused: nothing is written outside its folder."""
    temporary = write_temporary(path, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        remove_quietly(temporary)
        raise
    sync_folder(path)


def write_temporary(path, data):
    """`data` in a new temporary file beside `path` (PATH.<random>.tmp), flushed to disk; its name. A `path`
    that is a symbolic link is refused. The file is removed again if the write fails (a full disk, Ctrl-C)."""
    if os.path.islink(path):
        raise UserError(f"{path} is a symbolic link: this project writes its files itself, never through a link; "
                        "remove the link (or choose another output path)")
    temporary = f"{path}.{os.urandom(4).hex()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove_quietly(temporary)
        raise
    return temporary


def write_outputs(files, marker):
    """Several files of one result ({path: data}), then the file that says the result is finished, `marker` (a
    (path, data) pair: eval.py's metrics.json), last. Every file is written to its temporary first; the old
    marker is removed before the first rename, so that a stop at any moment leaves the old result whole, or no
    marker (unfinished: a grid evaluates it again), or the new result whole; never new files beside an old
    marker, which a grid would take for finished."""
    temporaries = {}
    try:
        for path, data in [*files.items(), marker]:
            temporaries[path] = write_temporary(path, data)
        if os.path.lexists(marker[0]):
            os.remove(marker[0])
        for path, temporary in temporaries.items():   # the marker's is the last
            os.replace(temporary, path)
    except BaseException:
        for temporary in temporaries.values():
            remove_quietly(temporary)
        raise
    for folder in {os.path.dirname(os.path.abspath(path)) for path in temporaries}:
        sync_folder(os.path.join(folder, "."))


def remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def sync_folder(path):
    """Flush the directory entry of `path` (a rename is only durable once its folder is)."""
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
