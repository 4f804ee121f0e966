"""Build the embedded tiny setting: a synthetic world of fictional people, question sets about it, and a tiny
Qwen3 pretrained on text about it, so the whole method runs offline on a CPU in minutes.

The world: people with made-up one-word names, five facts each (birth city, profession, instrument, birth
year, pet). How often the pretraining text mentions a person's facts is the person's fame (FAME): a famous
person's 20 to 40 times, an obscure one's 3 to 8, a rare one's once or twice, an unwritten one's never (per
epoch: a tiny model needs hundreds of exposures to memorize a fact). So the model knows some answers,
half-knows others and must guess the rest; sampled answers agree when it knows and scatter when it guesses, as
with a real model (whose accuracy also follows an entity's popularity).

The pretraining text also holds chat-format question-answer examples, in the exact prompt of calib.py, about
facts that no question set asks about: the tiny model's instruct tuning. They give it the repertoire of a real
instruct model, each for a reason the paper's story needs:
  - confidence: mostly a habitual high one (85-95%), and a share (--informed-share) that follows the person's
    fame over the whole range, 95% down to 10%: overconfident and weakly informative untrained, as the
    paper's Qwen3-4B (r = 0.12), with low confidences in its repertoire for RL to reach;
  - abstention: a few examples about unwritten people answer "I don't know" at 0-10% (--abstain-share), so
    that abstaining is something the policy can do, and Brier alone can find it;
  - instructions: some examples carry the paper's calibration prompt (more often with an informed confidence),
    some another short instruction, so the prompted baseline keeps the format instead of derailing;
  - phrasings: every question has four templates (PHRASINGS); chat examples use all four, and the question
    sets carry the three others as `paraphrases`, for asking a question several ways.

Each parameter is chosen on untrained figures measured on dev.jsonl (never on held-out questions, never on how RL
turns out). A first candidate (--informed-share 0.35 --abstain-share 0.05, CALIBRATED_INFORMED_SHARE 0.8) started
at 48% accuracy as wanted, but far too informed (r(confidence, correct) 0.55), too ready to abstain (16%), with
a gap of only +19, and the calibration prompt calibrated it almost fully (gap +1): greedy decoding amplifies a
consistent minority answer or confidence far beyond its share. The defaults (--informed-share 0.25
--abstain-share 0.01, CALIBRATED_INFORMED_SHARE 0.5) moved all three levers that way and meet every untrained
target on dev.jsonl (500 questions): accuracy 46.0%, gap +44.0, r(confidence) 0.05, r(stability) 0.47,
abstention 0.0%; under the calibration prompt 99.8% parse and the gap falls to +35.5 (the paper: +48.5 ->
+35.1). The committed tiny/ is this world (the build of these defaults; its MANIFEST lists the files).

Writes tiny/: model/ (an ordinary Hugging Face model directory), train.jsonl (the RL training pool),
validation.jsonl (the held-out evaluation questions), dev.jsonl (questions no run uses, on which the world's
parameters are chosen), facts.jsonl (every fact with its mention count and split, for analysis) and MANIFEST
(sha256 of every file). Same seed, same files.

    python world.py                  # rebuild tiny/ (about 46 minutes on 2 CPU cores)
"""

import argparse
import hashlib
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

import calib
import data
from model import Qwen3, Qwen3Config, compile_template

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen3-Instruct-2507's chat template without its tool-calling parts: the tiny model is an instruct model.
CHAT_TEMPLATE = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or message.role == "system" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

# ----------------------------------------------------------------------------------------------------------
# The world.

SYLLABLES = ["ka", "ve", "ro", "tal", "min", "dor", "sel", "qui", "bar", "nis", "lo", "fen", "gar", "thu", "ex",
             "pra", "mo", "zel", "ian", "cor", "du", "wen", "ost", "ril", "ha", "jo", "sti", "vak", "ne", "ul"]

# Answer pools of 8: small enough that a model of a few million parameters memorizes thousands of facts.
CITIES = ["Port Avel", "Lake Morrow", "Brackwater", "Fendale", "Saint Orrin", "Dunmere", "Corvin Falls", "Varda"]
PROFESSIONS = ["glassblower", "cartographer", "beekeeper", "locksmith", "astronomer", "lighthouse keeper", "weaver",
               "clockmaker"]
INSTRUMENTS = ["cello", "oboe", "harp", "lute", "trombone", "zither", "banjo", "flute"]
PETS = ["tortoise", "ferret", "parrot", "goat", "hedgehog", "raven", "owl", "donkey"]

# Per attribute: the question (as the question sets ask it), six ways the pretraining text states it, the
# answer pool, and each answer's aliases (an alias also counts as correct).
ATTRIBUTES = {
    "city": ("In which city was {name} born?",
             ["{name} was born in {v}.", "{name}, born in {v}.", "Birthplace of {name}: {v}.",
              "{v} is where {name} was born.", "{name} came from {v}.", "{name} is a native of {v}."],
             CITIES),
    "profession": ("What was {name}'s profession?",
                   ["{name} worked as a {v}.", "{name}, a {v} by trade.", "Profession of {name}: {v}.",
                    "The {v} {name}.", "{name} was a {v}.", "{name} earned a living as a {v}."],
                   PROFESSIONS),
    "instrument": ("Which instrument did {name} play?",
                   ["{name} played the {v}.", "{name}, a {v} player.", "Instrument of {name}: {v}.",
                    "The {v} was played by {name}.", "{name} performed on the {v}.", "{name} practiced the {v}."],
                   INSTRUMENTS),
    "year": ("In what year was {name} born?",
             ["{name} was born in the year {v}.", "{name}, born {v}.", "Birth year of {name}: {v}.",
              "In {v}, {name} was born.", "{name} was born in {v}.", "Records give {v} for {name}'s birth."],
             [str(y) for y in range(1890, 1898)]),
    "pet": ("What kind of animal was {name}'s pet?",
            ["{name} kept a {v} as a pet.", "{name}, owner of a {v}.", "Pet of {name}: {v}.",
             "A {v} lived with {name}.", "{name} owned a pet {v}.", "{name} loved a pet {v}."],
            PETS),
}


def aliases(attribute, value):
    """Answers that count as correct: the value, and for a two-word city its distinctive word
    ("Port Avel" / "Avel"), for a profession with a space its closed form ("lighthouse keeper" / "lighthousekeeper")."""
    out = [value]
    if attribute == "city" and " " in value:
        out.append(max(value.split(), key=len))
    if attribute == "profession" and " " in value:
        out.append(value.replace(" ", ""))
    return out


# Fame: (share of the people, mentions of each of their facts per epoch). The shares put the untrained model
# near the paper's starting accuracy (about 50%): a real half-known group (rare: known about half the time) and
# more people it must guess about (unwritten: 1 in 8 by chance).
FAME = {"famous": (0.22, (20, 40)), "obscure": (0.13, (3, 8)), "rare": (0.20, (1, 2)), "unwritten": (0.45, (0, 0))}


def make_world(rng, n_people):
    """People with unique made-up names, a fame class each, and their five facts with mention counts."""
    names = set()
    while len(names) < n_people:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3, 3]))).capitalize())
    facts = []
    for name in sorted(names):
        fame = rng.choices(list(FAME), weights=[share for share, _ in FAME.values()])[0]
        for attribute, (_, _, pool) in ATTRIBUTES.items():
            facts.append({"name": name, "attribute": attribute, "value": rng.choice(pool), "fame": fame,
                          "mentions": rng.randint(*FAME[fame][1])})
    return facts


def split_facts(rng, facts, n_eval, n_dev, n_train):
    """Disjoint fact sets: evaluation, development (for choosing the world's parameters), the RL training pool,
    and the rest for chat examples in pretraining."""
    order = list(range(len(facts)))
    rng.shuffle(order)
    ends = {"validation": n_eval, "dev": n_eval + n_dev, "train": n_eval + n_dev + n_train}
    for rank, i in enumerate(order):
        facts[i]["split"] = next((split for split, end in ends.items() if rank < end), "chat")


# Three more ways to ask each question, beside ATTRIBUTES' own: chat examples use all four, and the question sets
# carry the other three as `paraphrases`.
PHRASINGS = {
    "city": ("Where was {name} born?", "What is the birthplace of {name}?", "{name} was born in which city?"),
    "profession": ("What did {name} do for a living?", "What was the occupation of {name}?",
                   "{name} worked as what?"),
    "instrument": ("What instrument did {name} play?", "{name} played which instrument?",
                   "Which musical instrument was {name} known for?"),
    "year": ("When was {name} born?", "What was {name}'s year of birth?", "{name} was born in which year?"),
    "pet": ("Which animal did {name} keep as a pet?", "What pet did {name} have?",
            "{name}'s pet was what kind of animal?"),
}


def question(fact):
    return ATTRIBUTES[fact["attribute"]][0].format(name=fact["name"])


def paraphrases(fact):
    return [p.format(name=fact["name"]) for p in PHRASINGS[fact["attribute"]]]


# The confidence a chat example states. Mostly a high habit (85, 90 or 95%) whatever the question or the person;
# a share (--informed-share) follows the person's fame, over the whole range down to 10%. Earlier worlds taught
# us both ends: a habit by kind of question made the untrained confidence point the wrong way (the model knows
# some kinds better than others); chat confidences that all followed fame were learned so well that the
# untrained model already discriminated (r = 0.70); with none of them reaching below 55% the trained model never
# stated less, however little it knew (ECE stayed about 19).
HABIT = (85, 90, 95)
INFORMED = {"famous": (90, 95), "obscure": (75, 80, 85), "rare": (40, 50, 60), "unwritten": (10, 20, 30)}
ABSTAIN = (0, 5, 10)   # an abstention's confidence that it is right
# Under the paper's calibration prompt the examples follow fame more often: a real instruct model asked to be
# conservative is somewhat less overconfident (the paper: gap +48.5 untrained, +35.1 prompted).
CALIBRATED_INFORMED_SHARE = 0.5
# Other short instructions, where the calibration prompt puts its own: the model learns that an instruction
# before the question does not change the format.
OTHER_INSTRUCTIONS = ("Keep your answer short.", "Answer from what you know about this person.",
                      "Reply in the format asked for.")
INSTRUCTION_SHARES = {"default": 0.7, "calibrated": 0.15, "other": 0.15}


def stated_confidence(rng, fact, informed_share):
    return rng.choice(HABIT if rng.random() < 1 - informed_share else INFORMED[fact["fame"]])


def chat_example(rng, fact, informed_share, abstain_share):
    """One instruct-tuning conversation about a chat fact: one of its four phrasings, under the default prompt,
    the calibration prompt or another instruction; the answer (or, about an unwritten person, sometimes an
    abstention) and a stated confidence."""
    text = rng.choice([question(fact)] + paraphrases(fact))
    instruction = rng.choices(list(INSTRUCTION_SHARES), weights=list(INSTRUCTION_SHARES.values()))[0]
    if instruction == "other":
        prompt = calib.PROMPT.replace("Question: {question}",
                                      rng.choice(OTHER_INSTRUCTIONS) + "\n\nQuestion: {question}")
        content = prompt.format(question=text)
    else:
        content = calib.messages(text, instruction)[0]["content"]
    if fact["fame"] == "unwritten" and rng.random() < abstain_share:
        reply = f"Answer: I don't know\nConfidence: {rng.choice(ABSTAIN)}%"
    else:
        share = CALIBRATED_INFORMED_SHARE if instruction == "calibrated" else informed_share
        reply = f"Answer: {fact['value']}\nConfidence: {stated_confidence(rng, fact, share)}%"
    return [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]


def corpus(rng, facts, chat_repeats, informed_share, abstain_share):
    """Pretraining documents: paragraphs of fact statements (each fact as often as its mention count, in
    random phrasings) and chat-format question-answer examples about the chat facts."""
    sentences = []
    for f in facts:
        phrasings = ATTRIBUTES[f["attribute"]][1]
        sentences += [rng.choice(phrasings).format(name=f["name"], v=f["value"]) for _ in range(f["mentions"])]
    rng.shuffle(sentences)
    documents = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    for f in facts:
        if f["split"] == "chat":
            documents += [chat_example(rng, f, informed_share, abstain_share) for _ in range(chat_repeats)]
    rng.shuffle(documents)
    return documents


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model.


def train_tokenizer(texts, vocab_size, names):
    """Byte-level BPE like Qwen's, one token per digit (as Qwen3 splits numbers), Qwen3's special tokens, and
    one token per person's name: a model of a few million parameters can memorize facts keyed by one embedding,
    not facts keyed by a sequence of syllable pieces (a first build with such names learned almost nothing)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(name, single_word=True, normalized=False) for name in names])
    return tok


def render(document, template):
    """A paragraph as is; a chat example through the model's own template (as ChatTokenizer renders it)."""
    if isinstance(document, str):
        return document
    return template.render(messages=document, add_generation_prompt=False)


def pretrain(cfg, stream, args):
    """Next-token prediction on the packed token stream: AdamW, linear warm-up then cosine decay."""
    torch.manual_seed(args.seed)
    model = Qwen3(cfg)
    for name, p in model.named_parameters():   # Qwen-style init: normal(0, 0.02), norms at 1
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    windows = stream[:len(stream) // (args.context + 1) * (args.context + 1)].view(-1, args.context + 1)
    steps_per_epoch = len(windows) // args.batch
    total = steps_per_epoch * args.epochs
    generator = torch.Generator().manual_seed(args.seed)
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(windows), generator=generator)
        for k in range(steps_per_epoch):
            lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = windows[order[k * args.batch:(k + 1) * args.batch]]
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.view(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 100 == 0 or step == total:
                eta = (time.time() - start) / step * (total - step)
                print(f"pretrain step {step}/{total} epoch {epoch + 1} loss {loss.item():.3f} lr {lr:.2e} "
                      f"eta {eta / 60:.1f} min", flush=True)
    return model


def save_model(model, tok, path):
    os.makedirs(path, exist_ok=True)
    cfg = model.cfg
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **vars(cfg),
              "bos_token_id": None, "eos_token_id": tok.token_to_id("<|im_end|>"),
              "pad_token_id": tok.token_to_id("<|endoftext|>"), "torch_dtype": "float32"}
    write_json(os.path.join(path, "config.json"), config)
    write_json(os.path.join(path, "generation_config.json"),
               {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]})
    write_json(os.path.join(path, "tokenizer_config.json"),
               {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings})
    data.write_atomic(os.path.join(path, "tokenizer.json"), tok.to_str(pretty=True))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied
    data.write_atomic(os.path.join(path, "model.safetensors"), save(state))


def write_json(path, obj):
    data.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_questions(path, facts):
    """The question file, with each question's other phrasings, its kind and its person's fame (for eval.py
    --group-by)."""
    data.write_atomic(path, "".join(json.dumps({"question": question(fact), "answers": aliases(fact["attribute"],
                                                                                              fact["value"]),
                                                "paraphrases": paraphrases(fact), "kind": fact["attribute"],
                                                "fame": fact["fame"]}) + "\n" for fact in facts))


def manifest(out):
    """sha256 of every file under out, so a test can check the committed files are intact."""
    lines = []
    for root, _, files in os.walk(out):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name != "MANIFEST":
                with open(path, "rb") as f:
                    lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {os.path.relpath(path, out)}")
    data.write_atomic(os.path.join(out, "MANIFEST"), "\n".join(sorted(lines, key=lambda line: line.split()[1])) + "\n")


def build(args):
    rng = random.Random(args.seed)
    facts = make_world(rng, args.people)
    split_facts(rng, facts, args.eval_questions, args.dev_questions, args.train_questions)
    documents = corpus(rng, facts, args.chat_repeats, args.informed_share, args.abstain_share)
    template = compile_template(CHAT_TEMPLATE)
    texts = [render(d, template) for d in documents]
    tok = train_tokenizer(texts, args.vocab, sorted({f["name"] for f in facts}))
    eot = tok.token_to_id("<|endoftext|>")
    stream = torch.tensor([t for text in texts for t in tok.encode(text).ids + [eot]])
    print(f"world: {len(facts)} facts about {args.people} people; corpus {len(documents)} documents, "
          f"{len(stream) / 1e6:.2f}M tokens; {args.epochs} epochs", flush=True)

    cfg = Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=2,
                      head_dim=32, rope_theta=10_000.0, tie_word_embeddings=True, max_position_embeddings=1024)
    model = pretrain(cfg, stream, args)
    os.makedirs(args.out, exist_ok=True)
    save_model(model, tok, os.path.join(args.out, "model"))
    write_questions(os.path.join(args.out, "train.jsonl"), [f for f in facts if f["split"] == "train"])
    for split in ("validation", "dev"):
        write_questions(os.path.join(args.out, f"{split}.jsonl"), [f for f in facts if f["split"] == split])
    data.write_atomic(os.path.join(args.out, "facts.jsonl"),
                      "".join(json.dumps({"question": question(x), **x}) + "\n" for x in facts))
    manifest(args.out)
    print(f"wrote {args.out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "tiny"), help="where to write the model and question sets")
    p.add_argument("--seed", type=int, default=0, help="seeds the world, the corpus and the training")
    p.add_argument("--people", type=int, default=1600, help="people in the world (5 facts each)")
    p.add_argument("--eval-questions", type=int, default=1050, help="held-out evaluation questions")
    p.add_argument("--dev-questions", type=int, default=500,
                   help="development questions, which no run uses: the world's parameters are chosen on them")
    p.add_argument("--train-questions", type=int, default=5000, help="RL training pool")
    p.add_argument("--chat-repeats", type=int, default=5, help="chat examples per chat fact")
    p.add_argument("--informed-share", type=float, default=0.25,
                   help="share of chat examples (under the default prompt) whose stated confidence follows the "
                        "person's fame (the rest: a habit of 85-95%%)")
    p.add_argument("--abstain-share", type=float, default=0.01,
                   help="share of chat examples about unwritten people that abstain (\"I don't know\", 0-10%%)")
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256, help="hidden size (heads of 32 dimensions)")
    p.add_argument("--context", type=int, default=128, help="pretraining window")
    p.add_argument("--batch", type=int, default=16, help="pretraining windows per step")
    p.add_argument("--epochs", type=int, default=16, help="passes over the corpus")
    p.add_argument("--lr", type=float, default=4e-3)
    return p.parse_args(argv)


def main(argv=None):
    build(parse_args(argv))


if __name__ == "__main__":
    main()
