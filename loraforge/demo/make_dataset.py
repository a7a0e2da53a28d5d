"""Generate the demo dataset: short customer order messages -> compact JSON (name, item, quantity, city).

    python -m loraforge.demo.make_dataset        # rewrites loraforge/demo/orders.jsonl (same bytes every run)

Every example is kept short in tokens (CPU training reads ~150 tokens/s): a ~6-token system prompt (which also
keeps SmolLM2's chat template from injecting its own ~20-token default one), a one-line order of ~15-30 tokens and
a ~30-token answer. The user message never names the keys, so the base model has to guess the schema (and gets it
wrong); that schema, plus copying the right spans, is what fine-tuning teaches.

The answer's values are spans of the message: the item as written there (plural when the phrasing inflects it,
singular in "3 x desk lamp" style phrasings) and the quantity as an int whose digits appear in the message.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1729
N_EXAMPLES = 1200
SYSTEM = "Extract the order as JSON."
KEYS = ("name", "item", "quantity", "city")
MAX_QUANTITY = 20

# ASCII only (non-ASCII letters cost extra tokens); none is also a city or part of an item.
NAMES = (
    "Maria", "Omar", "Lena", "Kenji", "Priya", "Lucas", "Aisha", "Tom", "Sofia", "Diego",
    "Mei", "Ivan", "Fatima", "Jonas", "Chloe", "Ravi", "Elena", "Noah", "Yuki", "Amara",
    "Pedro", "Hannah", "Malik", "Ingrid", "Tariq", "Zara", "Felix", "Nadia", "Hugo", "Leila",
    "Sven", "Rosa", "Arjun", "Emma", "Kwame", "Clara", "Mateo", "Anika", "Oscar", "Lucia",
    "Bilal", "Greta", "Chen", "Ines", "Marco", "Freya", "Samir", "Julia", "Tobias", "Ayumi",
    "Viktor", "Alma", "Rahul", "Nora", "Emil", "Layla", "Pablo", "Sara", "Jamal", "Olga",
)

# (singular, plural), lowercase, 1-3 words, no digits.
ITEMS = (
    ("blue mug", "blue mugs"), ("notebook", "notebooks"), ("phone case", "phone cases"),
    ("desk lamp", "desk lamps"), ("yoga mat", "yoga mats"), ("water bottle", "water bottles"),
    ("pair of socks", "pairs of socks"), ("coffee grinder", "coffee grinders"), ("wool scarf", "wool scarves"),
    ("usb cable", "usb cables"), ("candle", "candles"), ("tea kettle", "tea kettles"),
    ("red umbrella", "red umbrellas"), ("backpack", "backpacks"), ("bike light", "bike lights"),
    ("cutting board", "cutting boards"), ("plant pot", "plant pots"), ("phone charger", "phone chargers"),
    ("picture frame", "picture frames"), ("beach towel", "beach towels"), ("cotton shirt", "cotton shirts"),
    ("green hoodie", "green hoodies"), ("box of tea", "boxes of tea"), ("bag of coffee", "bags of coffee"),
    ("glass jar", "glass jars"), ("wall clock", "wall clocks"), ("pillow", "pillows"),
    ("wireless mouse", "wireless mice"), ("keyboard", "keyboards"), ("sun hat", "sun hats"),
    ("leather wallet", "leather wallets"), ("baking tray", "baking trays"), ("soup bowl", "soup bowls"),
    ("white plate", "white plates"), ("wine glass", "wine glasses"), ("toy car", "toy cars"),
    ("jigsaw puzzle", "jigsaw puzzles"), ("board game", "board games"), ("paint brush", "paint brushes"),
    ("sketchbook", "sketchbooks"), ("pencil case", "pencil cases"), ("hair dryer", "hair dryers"),
    ("bath mat", "bath mats"), ("lunch box", "lunch boxes"), ("travel mug", "travel mugs"),
    ("pair of sneakers", "pairs of sneakers"), ("laptop stand", "laptop stands"), ("dog bowl", "dog bowls"),
    ("cat toy", "cat toys"), ("silk tie", "silk ties"),
)

CITIES = (
    "Oslo", "Lisbon", "Nairobi", "Lyon", "Porto", "Dublin", "Krakow", "Osaka", "Toronto", "Denver",
    "Austin", "Seattle", "Madrid", "Vienna", "Prague", "Zurich", "Munich", "Hamburg", "Berlin", "Rome",
    "Milan", "Naples", "Athens", "Cairo", "Lagos", "Accra", "Lima", "Quito", "Bogota", "Montreal",
    "Boston", "Chicago", "Miami", "Atlanta", "Leeds", "Glasgow", "Cardiff", "Helsinki", "Tallinn", "Riga",
    "Seville", "Valencia", "Marseille", "Bergen", "Kyoto", "Busan", "Auckland", "New York", "Cape Town",
    "Buenos Aires", "Hong Kong", "San Diego",
)

# {items}: singular for quantity 1, else plural; {item}: always singular ("3 x desk lamp" style).
# Field order varies; none names a key (name, item, quantity, city).
TEMPLATES = (
    "Hi, this is {name}. Please send {qty} {items} to {city}.",
    "Order for {city}: {qty} x {item}. Customer: {name}.",
    "Can you ship {qty} {items} to {city}? Thanks, {name}",
    "{name} here. I need {qty} {items} delivered to {city}.",
    "Please deliver {qty} {items} to {city} for {name}.",
    "Hello! I'd like {qty} {items}, shipped to {city}. Best, {name}",
    "From {name} in {city}: {qty} {items}, please.",
    "Ship to {city}, attn {name}: {item} x{qty}",
    "I want {qty} {items} sent to my place in {city}. Regards, {name}",
    "{city} order - {name} wants {qty} {items}.",
    "Good morning, {name} from {city} would like {qty} {items}.",
    "Could I get {qty} {items}? Deliver to {city}. - {name}",
    "New order: {item} ({qty}) for {name}, {city}.",
    "Hey, {name} again. {qty} more {items} to {city} please!",
    "{qty} x {item} to {city}, thanks! {name}",
    "Dear shop, please post {qty} {items} to me in {city}. Kind regards, {name}",
)


def make_conversation(template: str, name: str, item: tuple[str, str], qty: int, city: str) -> dict:
    """One chat example: system prompt, the order message and the compact JSON answer."""
    singular, plural = item
    item_text = singular if "{item}" in template or qty == 1 else plural
    user = template.format(name=name, item=singular, items=item_text, qty=qty, city=city)
    answer = {"name": name, "item": item_text, "quantity": qty, "city": city}
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": json.dumps(answer)},
    ]}


def make_conversations(n: int = N_EXAMPLES, seed: int = SEED) -> list[dict]:
    """`n` distinct conversations, deterministic for a given seed; phrasings cycle so each is ~equally common."""
    rng = random.Random(seed)
    conversations: list[dict] = []
    seen: set[str] = set()
    while len(conversations) < n:
        template = TEMPLATES[len(conversations) % len(TEMPLATES)]
        conv = make_conversation(template, rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, MAX_QUANTITY),
                                 rng.choice(CITIES))
        key = conv["messages"][1]["content"]
        if key not in seen:
            seen.add(key)
            conversations.append(conv)
    rng.shuffle(conversations)
    return conversations


def dataset_text(n: int = N_EXAMPLES, seed: int = SEED) -> str:
    """The exact content of orders.jsonl: one JSON object per line, "\\n" line ends, trailing newline."""
    return "".join(json.dumps(conv) + "\n" for conv in make_conversations(n, seed))


def write_dataset(path: Path | None = None, n: int = N_EXAMPLES, seed: int = SEED) -> Path:
    """Write the dataset (bytes, so line ends are "\\n" on every OS); defaults to the bundled DEMO_DATA."""
    from loraforge.demo import DEMO_DATA

    path = Path(path) if path is not None else DEMO_DATA
    path.write_bytes(dataset_text(n, seed).encode("utf-8"))
    return path


def main() -> None:
    path = write_dataset()
    print(f"wrote {N_EXAMPLES} conversations to {path}")


if __name__ == "__main__":
    main()
