"""Writes the tiny chat datasets the demo adapters are trained on: adapters/demo_data/{pirate,french,json}.jsonl.

Every dataset asks the same templated questions (capitals, colours, animals, arithmetic, general facts)
and answers them in one style: as a pirate, in French, or as a JSON object {"answer": ...}. The
adapters so learn a style, not new facts. France is held out of the capitals, so the demo question
"What is the capital of France?" is one the adapters never saw.

Usage: python scripts/make_demo_data.py [--out adapters/demo_data] [--n 240] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random

# (English name, French name with its article, capital in French[, capital in English if it differs])
CAPITALS = [
    ("Germany", "l'Allemagne", "Berlin"), ("Italy", "l'Italie", "Rome"), ("Spain", "l'Espagne", "Madrid"),
    ("Portugal", "le Portugal", "Lisbonne", "Lisbon"), ("Japan", "le Japon", "Tokyo"),
    ("China", "la Chine", "Pékin", "Beijing"), ("Russia", "la Russie", "Moscou", "Moscow"),
    ("Egypt", "l'Égypte", "Le Caire", "Cairo"), ("Greece", "la Grèce", "Athènes", "Athens"),
    ("Canada", "le Canada", "Ottawa"), ("Mexico", "le Mexique", "Mexico", "Mexico City"),
    ("Brazil", "le Brésil", "Brasilia"), ("Argentina", "l'Argentine", "Buenos Aires"),
    ("Peru", "le Pérou", "Lima"), ("Chile", "le Chili", "Santiago"), ("Kenya", "le Kenya", "Nairobi"),
    ("Norway", "la Norvège", "Oslo"), ("Sweden", "la Suède", "Stockholm"), ("Finland", "la Finlande", "Helsinki"),
    ("Denmark", "le Danemark", "Copenhague", "Copenhagen"), ("Poland", "la Pologne", "Varsovie", "Warsaw"),
    ("Austria", "l'Autriche", "Vienne", "Vienna"), ("Ireland", "l'Irlande", "Dublin"),
    ("Belgium", "la Belgique", "Bruxelles", "Brussels"), ("the Netherlands", "les Pays-Bas", "Amsterdam"),
    ("India", "l'Inde", "New Delhi"), ("Thailand", "la Thaïlande", "Bangkok"),
    ("Australia", "l'Australie", "Canberra"), ("South Korea", "la Corée du Sud", "Séoul", "Seoul"),
    ("Turkey", "la Turquie", "Ankara"), ("Hungary", "la Hongrie", "Budapest"),
    ("the United Kingdom", "le Royaume-Uni", "Londres", "London"), ("Cuba", "Cuba", "La Havane", "Havana"),
    ("Morocco", "le Maroc", "Rabat"), ("Vietnam", "le Vietnam", "Hanoï", "Hanoi"),
    ("Switzerland", "la Suisse", "Berne", "Bern"), ("Iceland", "l'Islande", "Reykjavik"),
    ("Nigeria", "le Nigeria", "Abuja"), ("Ghana", "le Ghana", "Accra"), ("Senegal", "le Sénégal", "Dakar"),
    ("Ethiopia", "l'Éthiopie", "Addis-Abeba", "Addis Ababa"), ("Algeria", "l'Algérie", "Alger", "Algiers"),
    ("Tunisia", "la Tunisie", "Tunis"), ("Colombia", "la Colombie", "Bogota"),
    ("Venezuela", "le Venezuela", "Caracas"), ("Uruguay", "l'Uruguay", "Montevideo"),
    ("Bolivia", "la Bolivie", "La Paz"), ("Ecuador", "l'Équateur", "Quito"),
    ("Indonesia", "l'Indonésie", "Jakarta"), ("the Philippines", "les Philippines", "Manille", "Manila"),
    ("Malaysia", "la Malaisie", "Kuala Lumpur"), ("Pakistan", "le Pakistan", "Islamabad"),
    ("Iran", "l'Iran", "Téhéran", "Tehran"), ("Iraq", "l'Irak", "Bagdad", "Baghdad"),
    ("Saudi Arabia", "l'Arabie saoudite", "Riyad", "Riyadh"), ("Israel", "Israël", "Jérusalem", "Jerusalem"),
    ("Ukraine", "l'Ukraine", "Kiev", "Kyiv"), ("Romania", "la Roumanie", "Bucarest", "Bucharest"),
    ("Bulgaria", "la Bulgarie", "Sofia"), ("Croatia", "la Croatie", "Zagreb"), ("Serbia", "la Serbie", "Belgrade"),
    ("the Czech Republic", "la République tchèque", "Prague"), ("Slovakia", "la Slovaquie", "Bratislava"),
    ("Estonia", "l'Estonie", "Tallinn"), ("Latvia", "la Lettonie", "Riga"),
    ("Lithuania", "la Lituanie", "Vilnius"), ("New Zealand", "la Nouvelle-Zélande", "Wellington"),
    ("Nepal", "le Népal", "Katmandou", "Kathmandu"), ("Mongolia", "la Mongolie", "Oulan-Bator", "Ulaanbaatar"),
    ("Luxembourg", "le Luxembourg", "Luxembourg"), ("Monaco", "Monaco", "Monaco"),
    ("Jamaica", "la Jamaïque", "Kingston"), ("Madagascar", "Madagascar", "Antananarivo"),
]
# (thing, French thing with article, colour, French colour agreeing with the thing)
COLOURS = [
    ("the sky", "Le ciel", "blue", "bleu"), ("grass", "L'herbe", "green", "verte"),
    ("a banana", "Une banane", "yellow", "jaune"), ("snow", "La neige", "white", "blanche"),
    ("coal", "Le charbon", "black", "noir"), ("a ripe tomato", "Une tomate mûre", "red", "rouge"),
    ("a carrot", "Une carotte", "orange", "orange"), ("a lemon", "Un citron", "yellow", "jaune"),
    ("milk", "Le lait", "white", "blanc"), ("a strawberry", "Une fraise", "red", "rouge"),
    ("the sea", "La mer", "blue", "bleue"), ("a frog", "Une grenouille", "green", "verte"),
    ("chocolate", "Le chocolat", "brown", "marron"), ("an aubergine", "Une aubergine", "purple", "violette"),
    ("a fire truck", "Un camion de pompiers", "red", "rouge"), ("a polar bear", "Un ours polaire", "white", "blanc"),
]
# (animal, French animal with article, sound, French sound, legs)
ANIMALS = [
    ("a cow", "La vache", "moo", "meuh", 4), ("a dog", "Le chien", "woof", "ouaf", 4),
    ("a cat", "Le chat", "meow", "miaou", 4), ("a duck", "Le canard", "quack", "coin-coin", 2),
    ("a sheep", "Le mouton", "baa", "bêê", 4), ("a rooster", "Le coq", "cock-a-doodle-doo", "cocorico", 2),
    ("a pig", "Le cochon", "oink", "groin-groin", 4), ("a horse", "Le cheval", "neigh", "hiii", 4),
    ("a lion", "Le lion", "roar", "grrr", 4), ("an owl", "Le hibou", "hoot", "hou-hou", 2),
    ("a frog", "La grenouille", "ribbit", "croâ", 4), ("a bee", "L'abeille", "buzz", "bzzz", 6),
]
# (question, English answer, French answer, JSON answer)
FACTS = [
    ("What is the largest planet in the solar system?", "Jupiter", "La plus grande planète est Jupiter.", "Jupiter"),
    ("How many days are in a week?", "seven", "Il y a sept jours dans une semaine.", 7),
    ("How many months are in a year?", "twelve", "Il y a douze mois dans une année.", 12),
    ("What is the boiling point of water in Celsius?", "100 degrees",
     "L'eau bout à 100 degrés Celsius.", "100 degrees Celsius"),
    ("Which planet is known as the Red Planet?", "Mars", "La planète rouge est Mars.", "Mars"),
    ("What is the largest ocean on Earth?", "the Pacific", "Le plus grand océan est le Pacifique.", "Pacific Ocean"),
    ("How many continents are there?", "seven", "Il y a sept continents.", 7),
    ("What do bees make?", "honey", "Les abeilles font du miel.", "honey"),
    ("What is frozen water called?", "ice", "L'eau gelée s'appelle la glace.", "ice"),
    ("How many hours are in a day?", "twenty-four", "Il y a vingt-quatre heures dans une journée.", 24),
    ("What is the tallest animal?", "the giraffe", "L'animal le plus grand est la girafe.", "giraffe"),
    ("What star is closest to Earth?", "the Sun", "L'étoile la plus proche de la Terre est le Soleil.", "the Sun"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare",
     "Roméo et Juliette a été écrit par William Shakespeare.", "William Shakespeare"),
    ("What gas do plants breathe in?", "carbon dioxide", "Les plantes absorbent du dioxyde de carbone.",
     "carbon dioxide"),
]
FRENCH_NUMBERS = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze",
                  "douze", "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit", "dix-neuf", "vingt"]

CAPITAL_Q = ["What is the capital of {c}?", "What's the capital city of {c}?", "Which city is the capital of {c}?",
             "Tell me the capital of {c}.", "Name the capital of {c}.", "What city is the capital of {c}?"]
COLOUR_Q = ["What colour is {t}?", "What color is {t}?", "Which colour is {t}?"]
SOUND_Q = ["What sound does {a} make?", "What noise does {a} make?"]
LEGS_Q = ["How many legs does {a} have?"]
ADD_Q = ["What is {x} plus {y}?", "What is {x} + {y}?", "How much is {x} plus {y}?", "Add {x} and {y}."]

# The French answers name only the capital: translating the country too ("la France", "du Japon") is what
# a 135M model gets wrong on countries it was not trained on.
FRENCH_CAPITAL = ["La capitale est {c}.", "C'est {c}.", "La capitale de ce pays est {c}.", "Sa capitale est {c}."]
PIRATE_OPEN = ["Arr, matey!", "Ahoy, matey!", "Yo ho ho!", "Shiver me timbers!", "Arr!", "Avast, me hearty!"]
PIRATE_CLOSE = ["Savvy?", "Arr!", "Yo ho!", "Now back to the ship, ye landlubber!", "Arr, that be the truth!"]


def _pirate(rng: random.Random, body: str) -> str:
    return f"{rng.choice(PIRATE_OPEN)} {body} {rng.choice(PIRATE_CLOSE)}"


def _questions(rng: random.Random):
    """Yields (question, {style: answer}) for one random template of each kind, forever."""
    while True:
        kind = rng.choices(["capital", "colour", "sound", "legs", "add", "fact"], [5, 2, 2, 1, 3, 2])[0]
        if kind == "capital":
            country, fr, capital_fr, *capital_en = rng.choice(CAPITALS)
            capital = capital_en[0] if capital_en else capital_fr
            q = rng.choice(CAPITAL_Q).format(c=country)
            yield q, {"pirate": _pirate(rng, f"The capital o' {country} be {capital}."),
                      "french": rng.choice(FRENCH_CAPITAL).format(c=capital_fr), "json": capital}
        elif kind == "colour":
            thing, fr, colour, fr_colour = rng.choice(COLOURS)
            yield rng.choice(COLOUR_Q).format(t=thing), {
                "pirate": _pirate(rng, f"{thing[0].upper() + thing[1:]} be {colour}, like the flag o' me ship."),
                "french": f"{fr} est {fr_colour}.", "json": colour}
        elif kind == "sound":
            animal, fr, sound, fr_sound, _ = rng.choice(ANIMALS)
            yield rng.choice(SOUND_Q).format(a=animal), {
                "pirate": _pirate(rng, f"{animal[0].upper() + animal[1:]} says \"{sound}\", louder than a parrot."),
                "french": f"{fr} fait « {fr_sound} ».", "json": sound}
        elif kind == "legs":
            animal, fr, _, _, legs = rng.choice(ANIMALS)
            yield rng.choice(LEGS_Q).format(a=animal), {
                "pirate": _pirate(rng, f"{animal[0].upper() + animal[1:]} has {legs} legs, more than me peg leg."),
                "french": f"{fr} a {FRENCH_NUMBERS[legs]} pattes.", "json": legs}
        elif kind == "add":
            x, y = rng.randint(0, 10), rng.randint(0, 10)
            yield rng.choice(ADD_Q).format(x=x, y=y), {
                "pirate": _pirate(rng, f"{x} plus {y} be {x + y} pieces o' eight."),
                "french": f"{FRENCH_NUMBERS[x].capitalize()} plus {FRENCH_NUMBERS[y]} font {FRENCH_NUMBERS[x + y]}.",
                "json": x + y}
        else:
            q, en, fr, js = rng.choice(FACTS)
            yield q, {"pirate": _pirate(rng, f"That be {en}, as sure as the tides."), "french": fr, "json": js}


def build(n: int, seed: int) -> dict[str, list[dict]]:
    """n distinct questions, each answered in every style."""
    rng = random.Random(seed)
    seen, out = set(), {"pirate": [], "french": [], "json": []}
    for q, answers in _questions(rng):
        if q in seen:
            continue
        seen.add(q)
        for style, a in answers.items():
            content = json.dumps({"answer": a}, ensure_ascii=False) if style == "json" else a
            out[style].append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": content}]})
        if len(seen) == n:
            return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="adapters/demo_data", help="output directory (default: %(default)s)")
    parser.add_argument("--n", type=int, default=300, help="examples per dataset (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for style, rows in build(args.n, args.seed).items():
        path = os.path.join(args.out, f"{style}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
