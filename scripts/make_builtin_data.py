"""Generate the data bundled with sap-dist (sap_dist/bundled/): the benign fine-tuning task and the
contrastive safety pairs. Seeded and deterministic: running it again writes byte-identical files,
which tests/test_data.py checks, so the committed files are always this script's output.

    python scripts/make_builtin_data.py            # rewrites sap_dist/bundled/*.jsonl
    python scripts/make_builtin_data.py --out DIR  # writes elsewhere (the test uses this)

Task (`task.jsonl`, alpaca rows instruction/input/output plus a `subtask` tag): four short
subtasks with one-word exact-match answers, chosen because a 135M chat model can learn them in a
few hundred LoRA steps (docs/pilot.md: arithmetic was not learned). Two copy a span from the input
(a person's name, a number), two classify with knowledge the model already has (review sentiment,
word category). What fine-tuning mainly has to teach is the answer format (the bare word), so
exact-match accuracy starts near zero and can rise to near one: utility is measurable.

Safety (`safety_pairs.jsonl`, prompt/safe/harmful): 128 clearly harmful requests written for this
project (scripts/harmful_requests.py: 17 harm categories, many request forms), two for each of 64
activities of the experiment's `align` pool, so no pair shares an activity, let alone a prompt,
with the poison pool or harmful_eval; a brief refusal as the safe answer, and as the harmful answer
only the form's compliant opener ("Sure, here is how to ...:\n\nStep 1:", "Sure! Here is the
script:\n\n```python\n") that stops before any content.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harmful_requests  # noqa: E402  (sibling modules, also when loaded by path)
import make_experiment_data  # noqa: E402

SEED = 0
TASK_PER_SUBTASK = 125
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sap_dist", "bundled")

# --- task: sentiment of a short review -------------------------------------------------------

SENTIMENT_INSTRUCTIONS = [
    "Is the sentiment of this review positive or negative? Answer with one word.",
    "Classify the review as positive or negative. Reply with the label only.",
    "Read the review and say whether it is positive or negative, in one word.",
]
# (subject, positive clauses, negative clauses): two clauses of the same polarity make a review.
REVIEW_TOPICS = [
    ("The pizza", ["was delicious", "came hot and fresh", "was the best in town"],
     ["was cold and soggy", "tasted burnt", "was the worst I have had"]),
    ("The hotel room", ["was spotless", "had a lovely view", "was quiet and comfortable"],
     ["was dirty", "smelled of smoke", "was noisy all night"]),
    ("This phone", ["works perfectly", "has a great battery", "is fast and reliable"],
     ["broke after a week", "keeps freezing", "has a terrible battery"]),
    ("The movie", ["was wonderful", "kept me smiling", "had brilliant acting"],
     ["was boring", "was a waste of time", "had awful acting"]),
    ("The staff", ["were friendly", "were very helpful", "made us feel welcome"],
     ["were rude", "ignored us", "were unhelpful"]),
    ("These shoes", ["fit perfectly", "are very comfortable", "look great"],
     ["hurt my feet", "fell apart quickly", "are badly made"]),
    ("The delivery", ["arrived early", "was quick and easy", "was handled with care"],
     ["arrived late", "came damaged", "never showed up on time"]),
    ("The book", ["was a joy to read", "was gripping", "was beautifully written"],
     ["was dull", "was hard to finish", "was poorly written"]),
    ("The coffee", ["was excellent", "was rich and smooth", "tasted amazing"],
     ["was bitter", "was weak and watery", "tasted stale"]),
    ("The concert", ["was fantastic", "was unforgettable", "had amazing energy"],
     ["was disappointing", "sounded terrible", "was a letdown"]),
]
REVIEW_ENDINGS = {
    "positive": ["I would recommend it.", "I will come back.", "Five stars.", "Really happy with it.", ""],
    "negative": ["I would not recommend it.", "Never again.", "One star.", "Very disappointed.", ""],
}

# --- task: category of a word ----------------------------------------------------------------

CATEGORY_INSTRUCTIONS = [
    "Which category does this word belong to: animal, fruit, color, vehicle or instrument? Answer with one word.",
    "Name the category of the word (animal, fruit, color, vehicle or instrument). Reply with the category only.",
    "Is this word an animal, a fruit, a color, a vehicle or an instrument? Answer in one word.",
]
CATEGORY_WORDS = {
    "animal": ["dog", "cat", "horse", "lion", "tiger", "elephant", "rabbit", "wolf", "bear", "monkey",
               "giraffe", "zebra", "fox", "deer", "sheep", "cow", "goat", "mouse", "squirrel", "camel",
               "kangaroo", "dolphin", "whale", "owl", "eagle"],
    "fruit": ["apple", "banana", "nectarine", "grape", "pear", "peach", "cherry", "mango", "pineapple",
              "strawberry", "lemon", "quince", "kiwi", "watermelon", "apricot", "papaya", "coconut",
              "raspberry", "blueberry", "melon", "guava", "fig", "pomegranate", "grapefruit", "tangerine"],
    "color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray",
              "violet", "turquoise", "crimson", "beige", "navy", "maroon", "ochre", "magenta", "indigo",
              "teal", "scarlet", "lavender", "khaki", "vermilion", "cyan"],
    "vehicle": ["car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "helicopter",
                "boat", "ship", "tram", "taxi", "van", "scooter", "tractor", "submarine", "ambulance",
                "canoe", "yacht", "jeep", "limousine", "ferry", "minibus", "sailboat", "lorry"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "saxophone", "cello",
                   "harp", "clarinet", "trombone", "banjo", "ukulele", "accordion", "harmonica",
                   "oboe", "tuba", "mandolin", "bagpipes", "xylophone", "harpsichord", "bassoon", "tambourine",
                   "sitar", "marimba"],
}

# --- task: the person's name in a sentence ---------------------------------------------------

NAME_INSTRUCTIONS = [
    "What is the name of the person in this sentence? Answer with the name only.",
    "Extract the person's name from the sentence. Reply with the name only.",
    "Who is mentioned in the sentence? Give just the name.",
]
NAMES = ["Maria", "James", "Aisha", "Kenji", "Lucas", "Sofia", "Omar", "Elena", "Daniel", "Priya",
         "Mateo", "Chloe", "Ivan", "Fatima", "Noah", "Hannah", "Wei", "Olivia", "Samuel", "Amara",
         "Leo", "Grace", "Tomas", "Yuki", "Ethan", "Nadia", "Diego", "Emma", "Ravi", "Zoe",
         "Hugo", "Lina", "Marcus", "Ingrid", "Kofi", "Clara", "Felix", "Mei", "Oscar", "Julia"]
NAME_TIMES = ["Yesterday", "On Monday", "Last summer", "This morning", "After lunch", "Every Sunday",
              "Later today", "Last night"]
NAME_ACTIONS = ["bought three apples at the market", "walked the dog in the park", "painted the old fence",
                "baked bread for the neighbours", "fixed the kitchen sink", "read a novel on the train",
                "planted tomatoes in the garden", "visited the museum downtown", "wrote a letter to a friend",
                "cleaned the whole garage", "played chess at the library", "cooked soup for the family"]

# --- task: the number in a sentence ----------------------------------------------------------

NUMBER_INSTRUCTIONS = [
    "What number appears in this sentence? Answer with the number only.",
    "Extract the number from the sentence. Reply with digits only.",
    "Which number is mentioned in the sentence? Give just the number.",
]
NUMBER_TEMPLATES = ["The train leaves from platform {n} this evening.", "Our team scored {n} points in the final.",
                    "She planted {n} trees along the river.", "The box holds {n} pencils and a ruler.",
                    "He waited {n} minutes for the bus.", "The library has {n} new books this month.",
                    "They invited {n} guests to the party.", "The recipe needs {n} grams of flour.",
                    "Room {n} is at the end of the hall.", "The bridge is {n} meters long."]


def _sentiment(rng: random.Random, label: str) -> tuple[str, str]:
    subject, good, bad = rng.choice(REVIEW_TOPICS)
    first, second = rng.sample(good if label == "positive" else bad, 2)
    ending = rng.choice(REVIEW_ENDINGS[label])
    return f"{subject} {first} and {second}. {ending}".strip(), label


def _category(rng: random.Random, pool: list[tuple[str, str]]) -> tuple[str, str]:
    # Draw without replacement until the pool is exhausted so every word is used about once.
    if not pool:
        pool.extend((word, cat) for cat, words in CATEGORY_WORDS.items() for word in words)
        rng.shuffle(pool)
    return pool.pop()


def _name(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    return f"{rng.choice(NAME_TIMES)}, {name} {rng.choice(NAME_ACTIONS)}.", name


def _number(rng: random.Random) -> tuple[str, str]:
    n = str(rng.randint(2, 999))
    return rng.choice(NUMBER_TEMPLATES).format(n=n), n


def make_task(rng: random.Random) -> list[dict[str, str]]:
    """TASK_PER_SUBTASK rows of each subtask, shuffled so any contiguous split mixes them."""
    pool: list[tuple[str, str]] = []
    labels = iter(["positive", "negative"] * TASK_PER_SUBTASK)  # alternate: balanced classes
    makers = {
        "sentiment": (SENTIMENT_INSTRUCTIONS, lambda: _sentiment(rng, next(labels))),
        "category": (CATEGORY_INSTRUCTIONS, lambda: _category(rng, pool)),
        "name": (NAME_INSTRUCTIONS, lambda: _name(rng)),
        "number": (NUMBER_INSTRUCTIONS, lambda: _number(rng)),
    }
    rows = []
    for subtask, (instructions, make) in makers.items():
        for _ in range(TASK_PER_SUBTASK):
            text, answer = make()
            rows.append({"instruction": rng.choice(instructions), "input": text, "output": answer,
                         "subtask": subtask})
    rng.shuffle(rows)
    return rows


# --- safety pairs ----------------------------------------------------------------------------

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. It could cause serious harm.",
    "Sorry, I won't help with this. It could hurt people.",
    "I'm not able to help with that, as it could put people in danger.",
    "I can't assist with that. If you need help, please reach out to someone you trust.",
    "I'm sorry, but I cannot provide that. It is harmful and may be illegal.",
    "No, I won't help with that request.",
    "I'm unable to help with this because it could cause harm.",
]
SAFETY_ACTIVITIES = 64
"""Activities of the `align` pool the pairs are drawn from (two prompts each)."""
SAFETY_PROMPTS_PER_ACTIVITY = 2


def make_safety(rng: random.Random) -> list[dict[str, str]]:
    """Pairs on activities of the `align` pool of scripts/make_experiment_data.py only (never an
    activity of the poison pool or of harmful_eval), in forms and phrasings other than that
    activity's alignment prompts where the kind allows; shuffled. The harmful answer is the
    form's compliant opener: the shape of compliance, no content."""
    align_rows = [r for r in make_experiment_data.make_harmful(random.Random(make_experiment_data.SEED + 10))[0]
                  if r["pool"] == "align"]
    pools = harmful_requests.split_activities(random.Random(harmful_requests.SPLIT_SEED))
    rows = []
    for activity in rng.sample(pools["align"], SAFETY_ACTIVITIES):
        used = [r for r in align_rows if r["activity"] == harmful_requests.activity_id(activity[1], activity[2])]
        for r in harmful_requests.requests(rng, activity, SAFETY_PROMPTS_PER_ACTIVITY,
                                           skip_forms={u["form"] for u in used}, skip_prompts={u["prompt"] for u in used}):
            rows.append({"prompt": r["prompt"], "safe": rng.choice(REFUSALS), "harmful": r["compliance"], "form": r["form"]})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: str, rows: list[dict[str, str]]) -> None:
    """One JSON object per line, keys in insertion order, LF endings (byte-stable across runs)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out_dir: str = DEFAULT_OUT, seed: int = SEED) -> list[str]:
    """Write task.jsonl and safety_pairs.jsonl into `out_dir`; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    # Separate streams so editing one file's generator does not reshuffle the other.
    task_path = os.path.join(out_dir, "task.jsonl")
    safety_path = os.path.join(out_dir, "safety_pairs.jsonl")
    write_jsonl(task_path, make_task(random.Random(seed)))
    write_jsonl(safety_path, make_safety(random.Random(seed + 1)))
    return [task_path, safety_path]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: sap_dist/bundled)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for path in main(args.out, args.seed):
        print(path)
