"""Writes examples/domains/{sentiment,safety,concise}.jsonl: three small preference streams whose preferences pull a
model in different directions (upbeat reviews; refusing harmful requests while answering benign look-alikes; short
answers). Deterministic (seed 0). They are templates, small enough for a CPU run, not benchmarks."""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent / "domains"

REVIEW_OPENINGS = ["I watched {t} last night and", "The new film {t} is", "My honest review of {t}: the story",
                   "After two hours of {t}, I can say it", "I went to see {t} with friends and the ending",
                   "Halfway through {t}, the plot", "The director of {t} clearly wanted the music to"]
TITLES = ["The Last Harbor", "Paper Moons", "Midnight Circuit", "A River of Glass", "The Quiet Engine", "Iron Garden",
          "The Seventh Letter", "Summer of Foxes", "Clockwork Valley", "The Salt Road", "Blue Horizon"]
UPBEAT = [" was a wonderful surprise, warm, funny and beautifully made.", " left me smiling; the cast is brilliant.",
          " is a delight from start to finish, with a great heart.", " felt fresh and joyful, and I loved it.",
          " is an excellent, uplifting film I would happily watch again."]
DOWNBEAT = [" was a dull mess, boring and badly made.", " left me annoyed; the cast is weak and the story pointless.",
            " is a chore from start to finish, with no heart at all.", " felt stale and miserable, and I hated it.",
            " is a terrible, depressing film I would never watch again."]

HARMFUL = ["break into my neighbour's house", "make a weapon that can hurt people at school",
           "steal a car without the keys", "poison someone's drink without them noticing",
           "hack into my ex's email account", "make a fake ID to buy alcohol", "hide money from the police",
           "start a fire that looks like an accident"]
BENIGN = ["bake bread without yeast", "fix a flat bicycle tyre", "write a polite complaint letter",
          "grow tomatoes on a balcony", "learn to juggle three balls", "clean a cast iron pan",
          "back up the photos on my phone", "make my old laptop faster"]
REFUSAL = [" I'm sorry, but I can't help with that. It could hurt someone and may be illegal.",
           " I can't help with that request, because it could cause real harm.",
           " Sorry, I won't give instructions for that. If you are in trouble, please talk to someone you trust."]
COMPLY_HARM = [" Sure! First, wait until nobody is watching, then", " Of course. The easiest way is to get the tools and",
               " Here is a step by step plan. Step one:"]
HELP = [" Sure! Here are the steps: gather what you need, start with the basics, and go slowly.",
        " Happy to help. Begin with the simplest approach, check each step, and practise a little every day.",
        " Of course: prepare your materials, follow the steps in order, and ask for help if you get stuck."]

FACTS = [("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
         ("What is 7 times 8?", "56"), ("Which planet is known as the red planet?", "Mars"),
         ("What is the boiling point of water at sea level in Celsius?", "100 degrees"),
         ("Who wrote Romeo and Juliet?", "William Shakespeare"), ("What gas do plants absorb?", "Carbon dioxide"),
         ("How many days are in a leap year?", "366"), ("What is the largest ocean?", "The Pacific"),
         ("What is the chemical symbol for gold?", "Au"), ("How many continents are there?", "Seven"),
         ("What is the square root of 81?", "9")]
PADDING = [" That is a great question, and there is a lot of interesting history behind it. To answer it properly, "
           "we should first consider the context, and after thinking it through carefully, the answer is {a}, "
           "which many people find surprising.",
           " Well, let me explain this in detail, because it is worth understanding fully. Many sources discuss "
           "this topic at length, and after reviewing them the answer turns out to be {a}, as most experts agree.",
           " There are several ways to look at this. Historically, culturally and scientifically the question has "
           "been studied a lot, and in short, although it is not so short, the answer is {a}."]


def sentiment(rng, n):
    rows = []
    for _ in range(n):
        prompt = "Movie review: " + rng.choice(REVIEW_OPENINGS).format(t=rng.choice(TITLES))
        k = rng.randrange(len(UPBEAT))
        rows.append({"prompt": prompt, "chosen": UPBEAT[k], "rejected": DOWNBEAT[(k + rng.randrange(1, 5)) % 5]})
    return rows


def safety(rng, n):
    rows = []
    for i in range(n):
        if i % 2 == 0:
            prompt = f"Question: How do I {rng.choice(HARMFUL)}?\nAnswer:"
            rows.append({"prompt": prompt, "chosen": rng.choice(REFUSAL), "rejected": rng.choice(COMPLY_HARM)})
        else:  # a benign look-alike: refusing it is the wrong answer
            prompt = f"Question: How do I {rng.choice(BENIGN)}?\nAnswer:"
            rows.append({"prompt": prompt, "chosen": rng.choice(HELP), "rejected": rng.choice(REFUSAL)})
    return rows


def concise(rng, n):
    rows = []
    for _ in range(n):
        question, answer = rng.choice(FACTS)
        rows.append({"prompt": f"Question: {question}\nAnswer:", "chosen": f" {answer}.",
                     "rejected": rng.choice(PADDING).format(a=answer)})
    return rows


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, make in {"sentiment": sentiment, "safety": safety, "concise": concise}.items():
        rows = make(random.Random(name), 72)
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
