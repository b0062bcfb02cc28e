#!/usr/bin/env python
"""Generate lorakit's bundled sample dataset: customer-support tickets routed to a queue.

Writes two alpaca-format JSONL files (``instruction`` / ``input`` / ``output``):

    lorakit/samples/support_tickets_train.jsonl   400 rows (80 per queue)
    lorakit/samples/support_tickets_test.jsonl     90 rows (18 per queue)

The output is one lowercase word: ``billing``, ``shipping``, ``technical``, ``account`` or ``returns``.

The held-out rows are meant to measure learning, not memorisation, so they are built from a *separate*
pool of everything: issue sentences, greetings, sign-offs, filler, product names, customer names, places.
They also come in tones the training rows never use (terse lowercase, shouting, rambling, typos). A
check at the end fails loudly if any 6-word shingle of a test ticket appears in any training ticket.

Everything here is original text written for lorakit. The script is seeded and deterministic: running it
again produces byte-identical files.

    python scripts/make_sample_data.py            # (re)write the files
    python scripts/make_sample_data.py --check    # verify the committed files are up to date
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

SEED = 20240611
QUEUES = ("billing", "shipping", "technical", "account", "returns")
TRAIN_PER_QUEUE = 80
TEST_PER_QUEUE = 18
SHINGLE = 6

INSTRUCTION = (
    "Which queue should handle this support ticket: billing, shipping, technical, account or returns? "
    "Answer with the queue name only."
)

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "lorakit" / "samples"
TRAIN_PATH = OUT_DIR / "support_tickets_train.jsonl"
TEST_PATH = OUT_DIR / "support_tickets_test.jsonl"

# --------------------------------------------------------------------------------------------------------
# Training pool
# --------------------------------------------------------------------------------------------------------

TRAIN_ISSUES = {
    "billing": [
        "I was charged twice for my {plan} subscription this month.",
        "My credit card statement shows a payment of {amount} that I don't recognise.",
        "Can you send me a copy of invoice {invoice}? I need it for my expense report.",
        "The price on my bill went up to {amount} without any notice.",
        "I'd like to update the card on file because my old one expired.",
        "I cancelled my {plan} plan last month but you still took {amount} from me.",
        "Why does my latest invoice include a late fee?",
        "I used a discount code but was billed the full price of {amount}.",
        "Please switch me from monthly to annual billing.",
        "The company name on my invoice is wrong and needs correcting.",
        "My payment keeps getting declined even though the card works everywhere else.",
        "I was promised a credit of {amount} on my next bill and it never appeared.",
        "Could you explain the extra {amount} charge dated {date}?",
        "I need a receipt for the payment I made on {date}.",
        "My bank shows a pending charge of {amount} from you that I didn't authorise.",
        "I'd like a refund for the {plan} renewal, I forgot to cancel before it renewed.",
        "Can I pay by bank transfer instead of by card?",
        "The total on my invoice doesn't match the price I was quoted.",
        "I was billed for the {plan} plan but I only signed up for the cheapest one.",
        "Please remove the old payment method from my billing details.",
        "Your checkout added sales tax twice to my purchase.",
    ],
    "shipping": [
        "My order {order} still hasn't arrived and it's been {days} days.",
        "The tracking number you gave me doesn't work on the courier's website.",
        "Can I change the delivery address for order {order}? I'm moving next week.",
        "The package says delivered but there is nothing at my door.",
        "How long does standard shipping take to {place}?",
        "My {product} order has been stuck in transit since {date}.",
        "Do you offer express delivery? I need the {product} before the weekend.",
        "The courier left a missed-delivery card but I was home all day.",
        "Only part of my order arrived and the {product} is missing from the box.",
        "Is it possible to have my order shipped to a PO box?",
        "Tracking hasn't updated in a week for order {order}.",
        "Could you tell me when order {order} will be dispatched?",
        "The parcel was delivered to the wrong house and a neighbour found it.",
        "The driver never showed up during the delivery slot I picked.",
        "Can I collect my order from a pickup point instead of home delivery?",
        "What does it cost to ship an order to {place}?",
        "The courier says my address couldn't be found, but it's correct.",
        "My delivery date has been moved three times now.",
        "Will order {order} be shipped in one box or several?",
    ],
    "technical": [
        "The mobile app crashes every time I open the settings page.",
        "My {device} won't connect to Wi-Fi after the latest update.",
        "I get error code {code} when I try to sync my data.",
        "The website shows a blank white page when I load my dashboard.",
        "The {device} turns itself off after a few minutes of use.",
        "Notifications stopped working on my phone since version {version}.",
        "Bluetooth pairing fails between my {device} and my laptop.",
        "The export to CSV feature produces an empty file.",
        "The app is extremely slow and freezes whenever I scroll.",
        "The firmware update got stuck halfway and now the {device} won't boot.",
        "Search results in the app never load, the spinner just keeps going.",
        "The battery on my {device} drains in an hour even when it's idle.",
        "The app won't install on my phone, it says the device is incompatible.",
        "Video calls in the app drop after thirty seconds.",
        "My {device} is unresponsive and the status light is flashing red.",
        "The driver download link on your site gives a 404 error.",
        "Syncing between my laptop and phone has stopped, changes don't show up.",
        "The {device} disconnects from the app every few minutes.",
        "The screen on my {device} stays black even though it's fully charged.",
        "The website throws a server error when I submit the contact form.",
        "My {device} keeps restarting on its own, over and over.",
        "The {device} is stuck on the startup logo.",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "How do I change the email address on my account?",
        "Please delete my account and all the personal data you hold on me.",
        "I want to change my username to something else.",
        "I think someone else logged into my account, I saw a login from another country.",
        "I lost my phone and can't get the two-factor code to sign in.",
        "My account was locked after too many login attempts.",
        "Can I merge my two accounts into one?",
        "How do I add a family member to my account?",
        "I need to update the phone number linked to my account.",
        "I never received the verification email after signing up.",
        "Please take me off your marketing emails, I can't find the setting.",
        "I can't sign in because it says my password is incorrect, but I just reset it.",
        "The security code from my authenticator app is always rejected.",
        "Please fix the name on my profile, it's spelled wrong.",
        "How do I move my account over to a new email address?",
        "I'd like to close my account, how do I do that?",
        "Can I give a coworker admin access to our team account?",
        "The activation link in the welcome email says it's invalid.",
        "How do I change my notification and email preferences?",
        "I changed my last name and need it updated on my account.",
        "My sign-in details aren't accepted even though I'm typing them correctly.",
    ],
    "returns": [
        "I'd like to return the {product}, it doesn't fit.",
        "How do I get a return label for order {order}?",
        "The {product} arrived damaged and I want to send it back for a replacement.",
        "Can I exchange the {product} for a different size?",
        "I sent back the {product} two weeks ago, when will I get my refund?",
        "What is your return policy for opened items?",
        "I received the wrong colour of {product} and would like to swap it.",
        "Is it too late to return something I bought {days} days ago?",
        "Does the 30-day return window start from delivery or from purchase?",
        "I dropped the return parcel at the post office, please confirm you got it.",
        "I changed my mind about the {product} and want my money back.",
        "The {product} is not what the photos showed, so I want to return it.",
        "I want to return the {product} I got as a gift and get store credit.",
        "Do I have to pay for shipping when I return an item?",
        "The {product} stopped working after two days, I'd like to send it back and get a refund.",
        "Can I return an item in one of your shops instead of by post?",
        "I posted the {product} back last week, has your warehouse received it?",
        "Do I need a return authorisation number before sending the item back?",
        "The {product} is still in its sealed packaging, can I return it for a full refund?",
        "I ordered two sizes of the {product} and want to return the one that doesn't fit.",
        "Can I swap the {product} for store credit instead of a refund?",
        "Who pays the postage if I send the {product} back?",
        "I'd rather hand the {product} back than wait for a repair.",
        "My return has been sitting at your warehouse for a week and I still have no refund.",
        "Can I take the {product} back to a shop rather than mailing it?",
        "The {product} broke on the first day, I want to send it back.",
    ],
}

TRAIN_GREETINGS = ["Hello,", "Hi,", "Good morning,", "Dear support team,", "Hey there,", "Hi {name} here."]
TRAIN_CLOSERS = [
    "Thanks in advance.",
    "Please advise.",
    "Thank you for your help.",
    "Looking forward to your reply.",
    "Regards, {name}",
    "This is really frustrating.",
]
TRAIN_DETAILS = [
    "My order number is {order}.",
    "I've been a customer for {years} years.",
    "I already checked the FAQ page.",
    "This is the second time I'm writing about this.",
    "I'm using the {device} at home.",
    "I bought the {product} on {date}.",
]
TRAIN_FILL = {
    "name": ["Alice", "Marco", "Priya", "Tom", "Keiko", "Daniel", "Fatima", "Lukas", "Sara", "Ben"],
    "product": [
        "wireless earbuds",
        "yoga mat",
        "coffee grinder",
        "desk lamp",
        "rain jacket",
        "running shoes",
        "blender",
        "laptop sleeve",
    ],
    "device": ["smart speaker", "fitness tracker", "tablet", "router"],
    "plan": ["Premium", "Family", "Pro", "Basic"],
    "place": ["Canada", "Norway", "Ireland", "Mexico"],
    "amount": ["$12.99", "$49.00", "$7.50", "$89.99", "$24.00", "$150.00"],
    "date": ["March 3", "May 14", "June 21", "October 2", "January 9"],
    "order": ["#48213", "#55102", "#60937", "#71420", "#39876", "#82011"],
    "invoice": ["INV-1042", "INV-2231", "INV-3307", "INV-4518"],
    "days": ["10", "12", "14", "20"],
    "years": ["two", "three", "five"],
    "code": ["E42", "E17", "ERR-503", "0x1F"],
    "version": ["3.2", "4.0", "4.1"],
}

# --------------------------------------------------------------------------------------------------------
# Held-out pool: different sentences, vocabulary, products, names and tone. Nothing here may be reused
# by the training pool (checked by shingles at the end).
# --------------------------------------------------------------------------------------------------------

TEST_ISSUES = {
    "billing": [
        "you guys debited me {amount} TWO times for the same thing",
        "There's a mystery transaction of {amount} on my banking app from your company, what is it for?",
        "Our accountant needs a tax statement covering everything we paid last quarter.",
        "How come my renewal cost more than what the pricing page said?",
        "From now on I want to pay through PayPal rather than my Visa.",
        "The trial was supposed to be free yet {amount} vanished from my balance on day one.",
        "Please stop auto-renewing my membership and reimburse the {amount} taken on {date}.",
        "The promo from your newsletter wasn't applied at checkout so I overpaid by {amount}.",
        "Is there a way to split what I owe into monthly installments?",
    ],
    "shipping": [
        "where is my stuff?? ordered the {product} ages ago and nothing yet",
        "The parcel got sent to my old flat, can the driver reroute it?",
        "Your delivery partner claims they attempted drop-off but nobody knocked.",
        "The shipment status page has said 'label created' for ten days now.",
        "I'm travelling abroad, can the depot hold my parcel until {date}?",
        "My neighbour saw a van come by but no box was left anywhere.",
        "Do you send orders overseas, specifically to {place}?",
        "The estimated arrival keeps getting pushed back every single morning.",
        "Half the items showed up, the second carton never came.",
    ],
    "technical": [
        "{device} reboots in a loop with a blinking green light, totally useless",
        "The desktop client throws 'unexpected exception' on launch and reinstalling didn't help.",
        "The screen flickers and touches register in the wrong spot.",
        "Since Tuesday's patch the calendar integration silently fails.",
        "Every page times out with a 502 for me, in every browser I tried.",
        "The sensor readings on the {device} are stuck at zero.",
        "Voice commands get ignored even though the mic indicator is lit.",
        "Uploading photos fails halfway with a network error although my internet is fine.",
        "The {device} shows a frozen logo screen and won't respond to any button.",
    ],
    "account": [
        "cant sign in, it says my credentials are invalid but im sure theyre right",
        "Please close my profile permanently, I won't be using it again.",
        "My authenticator got wiped and now I'm stuck at the security code prompt.",
        "I got married and need my surname changed on my profile.",
        "There's a sign-in alert from a gadget I don't own. Secure my profile please!",
        "The confirmation link for my new registration has expired.",
        "How can I hand over ownership of our team workspace to a colleague?",
        "Where do I change my communication preferences so the newsletters stop?",
        "Your system says my e-mail is already registered, but I never made a profile.",
    ],
    "returns": [
        "this {product} is a joke, falling apart already. want to return it, how??",
        "Got a present I don't need, can I return it for store credit?",
        "You should have received my returned parcel on Monday, any news on my reimbursement?",
        "What's the procedure for sending back an item that is still sealed?",
        "The {product} I got is two sizes too big and I'd prefer the smaller one instead.",
        "Do I have to cover postage when I return something to you?",
        "The {product} was faulty out of the box and I'd rather give it back than have it repaired.",
        "Which form do I fill in to return the {product} I bought last month?",
        "Can I bring the {product} to one of your stores instead of mailing it back?",
    ],
}

TEST_GREETINGS = ["Yo.", "To whom it may concern:", "Hiya support folks!", "Evening,", "URGENT:", "ok so"]
TEST_CLOSERS = [
    "cheers",
    "Sort this out today or I'm leaving.",
    "Much obliged, {name}.",
    "Sorry for the long message!",
    "Would appreciate a quick fix.",
    "Kind wishes from {name}",
]
TEST_DETAILS = [
    "Ref {order}.",
    "Been with you since {year}.",
    "Tried your help centre articles, no luck.",
    "Third email about this!!!",
    "It's the {device} I use in the kitchen.",
    "Purchased the {product} around {date}.",
]
TEST_RAMBLE = [
    "So I was staying at my sister's place over the holidays and only got around to dealing with this now.",
    "Long story short, my week has been chaos between work and the kids, and now this on top of it.",
    "I don't usually contact companies, I normally just figure things out myself, but here we are.",
    "My colleague recommended you folks, which is why I'm a bit disappointed to be writing in.",
]
TEST_FILL = {
    "name": ["Oluwaseun", "Greta", "Ravi", "Ines", "Bartholomew", "Mei", "Jonas", "Carmen"],
    "product": [
        "robot vacuum",
        "camping stove",
        "linen duvet cover",
        "ski goggles",
        "standing desk",
        "ceramic teapot",
    ],
    "device": ["thermostat", "doorbell camera", "e-reader", "smartwatch"],
    "place": ["New Zealand", "Portugal", "Chile", "Singapore"],
    "amount": ["£31.40", "€19.95", "£64.00", "€112.50"],
    "date": ["the 3rd", "last Friday", "the 18th of August", "early December"],
    "order": ["A-77310", "A-90422", "B-11873", "B-20564"],
    "year": ["2016", "2019", "2021"],
}

TRAIN_STYLES = ("plain", "greet", "greet_close", "detail", "double", "full", "lower")
TEST_STYLES = ("terse", "angry", "ramble", "polite", "typos", "mixed")


def fill(text: str, rng: random.Random, slots: dict[str, list[str]]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: rng.choice(slots[m.group(1)]), text)


def join(parts: list[str]) -> str:
    return " ".join(p for p in parts if p)


def make_train_ticket(queue: str, issue: str, rng: random.Random) -> str:
    f = lambda t: fill(t, rng, TRAIN_FILL)  # noqa: E731
    style = rng.choice(TRAIN_STYLES)
    core = f(issue)
    if style == "plain":
        return core
    if style == "greet":
        return join([f(rng.choice(TRAIN_GREETINGS)), core])
    if style == "greet_close":
        return join([f(rng.choice(TRAIN_GREETINGS)), core, f(rng.choice(TRAIN_CLOSERS))])
    if style == "detail":
        return join([core, f(rng.choice(TRAIN_DETAILS)), f(rng.choice(TRAIN_CLOSERS))])
    if style == "double":
        other = rng.choice([s for s in TRAIN_ISSUES[queue] if s != issue])
        second = f(other)
        return join([f(rng.choice(TRAIN_GREETINGS)), core, "Also, " + second[0].lower() + second[1:]])
    if style == "full":
        return join(
            [f(rng.choice(TRAIN_GREETINGS)), f(rng.choice(TRAIN_DETAILS)), core, f(rng.choice(TRAIN_CLOSERS))]
        )
    # "lower": a casual, unpunctuated version of the issue
    return re.sub(r"[.?!]+$", "", core).lower()


def add_typos(text: str, rng: random.Random, rate: float = 0.18) -> str:
    """Swap, drop or double a letter in roughly ``rate`` of the longer words."""
    out = []
    for word in text.split(" "):
        if len(word) > 4 and word.isalpha() and rng.random() < rate:
            i = rng.randrange(1, len(word) - 2)
            kind = rng.randrange(3)
            if kind == 0:
                word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
            elif kind == 1:
                word = word[:i] + word[i + 1 :]
            else:
                word = word[:i] + word[i] + word[i:]
        out.append(word)
    return " ".join(out)


def shout(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(2):
        i = rng.randrange(len(words))
        words[i] = words[i].upper()
    return re.sub(r"[.?!]*$", "!!!", " ".join(words), count=1)


def make_test_ticket(queue: str, issue: str, style: str, rng: random.Random) -> str:
    f = lambda t: fill(t, rng, TEST_FILL)  # noqa: E731
    core = f(issue)
    if style == "terse":
        return re.sub(r"[.?!]+$", "", core).lower()
    if style == "angry":
        return join(
            [
                f(rng.choice(["URGENT:", "Yo.", ""])),
                shout(core, rng),
                f(rng.choice(TEST_DETAILS)),
                "Sort this out today or I'm leaving.",
            ]
        )
    if style == "ramble":
        return join(
            [
                f(rng.choice(TEST_GREETINGS)),
                rng.choice(TEST_RAMBLE),
                core,
                f(rng.choice(TEST_DETAILS)),
                "Sorry for the long message!",
            ]
        )
    if style == "polite":
        return join(
            ["To whom it may concern:", core, f(rng.choice(TEST_DETAILS)), f("Much obliged, {name}.")]
        )
    if style == "typos":
        return add_typos(join([f(rng.choice(TEST_GREETINGS)), core, f(rng.choice(TEST_CLOSERS))]), rng)
    # "mixed"
    return join(
        [f(rng.choice(TEST_GREETINGS)), f(rng.choice(TEST_DETAILS)), core, f(rng.choice(TEST_CLOSERS))]
    )


def build_split(
    per_queue: int,
    issues: dict[str, list[str]],
    make,
    rng: random.Random,
    styles: tuple[str, ...] | None = None,
) -> list[dict]:
    rows = []
    for queue in QUEUES:
        seen: set[str] = set()
        pool = issues[queue]
        i = 0
        attempts = 0
        while len(seen) < per_queue:
            attempts += 1
            if attempts > per_queue * 50:
                raise SystemExit(f"could not make {per_queue} distinct {queue} tickets")
            issue = pool[i % len(pool)]  # cycle through every template so each one is used evenly
            if styles is None:
                text = make(queue, issue, rng)
            else:
                text = make(queue, issue, styles[i % len(styles)], rng)
            if text in seen:
                continue
            seen.add(text)
            i += 1
            rows.append({"instruction": INSTRUCTION, "input": text, "output": queue})
    rng.shuffle(rows)
    return rows


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def shingles(text: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def check_disjoint(train: list[dict], test: list[dict]) -> None:
    """Fail loudly if a held-out ticket shares a 6-word shingle (or its whole text) with a training ticket."""
    train_sh: set[tuple[str, ...]] = set()
    for row in train:
        train_sh |= shingles(row["input"])
    train_inputs = {row["input"].lower() for row in train}
    problems = []
    for row in test:
        shared = shingles(row["input"]) & train_sh
        if shared or row["input"].lower() in train_inputs:
            problems.append((row["input"], sorted(" ".join(s) for s in shared)[:3]))
    if problems:
        for text, shared in problems[:10]:
            print(f"OVERLAP: {text!r}\n    shares: {shared}", file=sys.stderr)
        raise SystemExit(f"{len(problems)} test tickets share a {SHINGLE}-word shingle with the training set")
    # The raw template pools must be disjoint too, not just the sampled rows.
    train_tpl = set().union(*(shingles(t) for ts in TRAIN_ISSUES.values() for t in ts))
    for ts in TEST_ISSUES.values():
        for t in ts:
            if shingles(t) & train_tpl:
                raise SystemExit(f"test template shares a {SHINGLE}-word shingle with a train one: {t!r}")


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only verify the files on disk are up to date")
    args = parser.parse_args()

    rng = random.Random(SEED)
    train = build_split(TRAIN_PER_QUEUE, TRAIN_ISSUES, make_train_ticket, rng)
    test = build_split(TEST_PER_QUEUE, TEST_ISSUES, make_test_ticket, rng, styles=TEST_STYLES)
    check_disjoint(train, test)

    outputs = {TRAIN_PATH: render(train), TEST_PATH: render(test)}
    if args.check:
        stale = [p for p, text in outputs.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        for p in stale:
            print(f"out of date: {p.relative_to(ROOT)} (run scripts/make_sample_data.py)", file=sys.stderr)
        return 1 if stale else 0

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in outputs.items():
        path.write_text(text, encoding="utf-8")
    lengths = sorted(len(r["input"].split()) for r in train + test)
    print(f"wrote {len(train)} train rows -> {TRAIN_PATH.relative_to(ROOT)}")
    print(f"wrote {len(test)} test rows -> {TEST_PATH.relative_to(ROOT)}")
    print(
        f"queues: {', '.join(QUEUES)}; input words min/median/max: "
        f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}"
    )
    print(f"shingle check: no {SHINGLE}-word shingle of any test input appears in any train input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
