"""Writes examples/sentiment_pairs.jsonl: a small bundled stream of movie-review continuations where the positive
one is preferred (the controlled-sentiment task of the DPO paper, in miniature). Deterministic: seed 0."""

import json
import random
from pathlib import Path

OPENINGS = [
    "I watched {title} last night and", "The new film {title} is", "After two hours of {title}, I can say it",
    "My honest review of {title}: the story", "Critics keep talking about {title}, and the acting",
    "I went to see {title} with friends and the ending", "{title} opens with a long scene that",
    "The director of {title} clearly wanted the music to", "Halfway through {title}, the plot",
    "Everyone told me {title} would be different, and it",
]
TITLES = ["The Last Harbor", "Paper Moons", "Midnight Circuit", "A River of Glass", "The Quiet Engine",
          "Northern Lights Cafe", "Iron Garden", "The Seventh Letter", "Summer of Foxes", "Clockwork Valley",
          "The Salt Road", "Blue Horizon"]
POSITIVE = [
    " was a wonderful surprise, warm, funny and beautifully made.",
    " left me smiling for hours; the cast is brilliant and the story is moving.",
    " is a delight from start to finish, with gorgeous music and a great heart.",
    " felt fresh and joyful, and I loved every minute of it.",
    " is an excellent, uplifting film that I would happily watch again.",
    " shines with clever writing, lovely performances and real charm.",
]
NEGATIVE = [
    " was a dull mess, boring and badly made.",
    " left me annoyed for hours; the cast is weak and the story is pointless.",
    " is a chore from start to finish, with awful music and no heart at all.",
    " felt stale and miserable, and I hated most of it.",
    " is a terrible, depressing film that I would never watch again.",
    " drags with lazy writing, wooden performances and no charm.",
]


def main() -> None:
    rng = random.Random(0)
    rows = []
    for i in range(160):
        prompt = "Movie review: " + rng.choice(OPENINGS).format(title=rng.choice(TITLES))
        k = rng.randrange(len(POSITIVE))
        rows.append({"prompt": prompt, "chosen": POSITIVE[k], "rejected": NEGATIVE[(k + rng.randrange(1, 6)) % 6]})
    out = Path(__file__).with_name("sentiment_pairs.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    held = Path(__file__).with_name("sentiment_heldout.jsonl")
    rng = random.Random(1)
    rows = []
    for i in range(32):
        prompt = "Movie review: " + rng.choice(OPENINGS).format(title=rng.choice(TITLES))
        k = rng.randrange(len(POSITIVE))
        rows.append({"prompt": prompt, "chosen": POSITIVE[k], "rejected": NEGATIVE[k]})
    held.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
