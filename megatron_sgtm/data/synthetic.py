"""Embedded bilingual story corpus: the default data when nothing can be downloaded.

Each story is planned once in a language-neutral form (characters, objects, places, a problem
and its resolution, a moral) and then realised by a per-language grammar with articles,
gender agreement and contractions. English stories are the retain domain, Spanish the forget
domain and Italian the "adjacent" domain (a related Romance language, for the strict-filter
baseline and adjacent-loss evaluation). Document ``i`` depends only on ``(seed, i)``, so any
slice of a corpus of tens of millions of tokens can be generated independently.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping
from itertools import accumulate
from types import SimpleNamespace
from typing import TextIO

from megatron_sgtm.data.sources import Document

RETAIN_CATEGORY = "english"
FORGET_CATEGORY = "spanish"
ADJACENT_CATEGORY = "italian"
CATEGORIES = (RETAIN_CATEGORY, FORGET_CATEGORY, ADJACENT_CATEGORY)
DEFAULT_MIX = {RETAIN_CATEGORY: 0.6, FORGET_CATEGORY: 0.3, ADJACENT_CATEGORY: 0.1}

# Concepts shared by all languages, index-aligned across languages. Romance nouns are
# (definite, indefinite, gender); English animals are (noun, gender of the character).
ANIMALS = {
    "en": [("dog", "m"), ("cat", "m"), ("bird", "m"), ("rabbit", "m"), ("fox", "f"), ("bear", "m"),
        ("mouse", "m"), ("frog", "f"), ("owl", "f"), ("duck", "f"), ("turtle", "f"), ("lion", "m"),
        ("wolf", "m"), ("horse", "m"), ("goat", "f"), ("bee", "f")],
    "es": [("el perro", "un perro", "m"), ("el gato", "un gato", "m"), ("el pájaro", "un pájaro", "m"),
           ("el conejo", "un conejo", "m"), ("la zorra", "una zorra", "f"), ("el oso", "un oso", "m"),
           ("el ratón", "un ratón", "m"), ("la rana", "una rana", "f"), ("la lechuza", "una lechuza", "f"),
           ("la pata", "una pata", "f"), ("la tortuga", "una tortuga", "f"), ("el león", "un león", "m"),
           ("el lobo", "un lobo", "m"), ("el caballo", "un caballo", "m"), ("la cabra", "una cabra", "f"),
           ("la abeja", "una abeja", "f")],
    "it": [("il cane", "un cane", "m"), ("il gatto", "un gatto", "m"), ("l'uccello", "un uccello", "m"),
           ("il coniglio", "un coniglio", "m"), ("la volpe", "una volpe", "f"), ("l'orso", "un orso", "m"),
           ("il topo", "un topo", "m"), ("la rana", "una rana", "f"), ("la civetta", "una civetta", "f"),
           ("l'anatra", "un'anatra", "f"), ("la tartaruga", "una tartaruga", "f"), ("il leone", "un leone", "m"),
           ("il lupo", "un lupo", "m"), ("il cavallo", "un cavallo", "m"), ("la capra", "una capra", "f"),
           ("l'ape", "un'ape", "f")],
}
OBJECTS = {
    "en": ["ball", "kite", "box", "book", "hat", "apple", "cake", "flower", "boat", "key", "map", "drum",
           "lamp", "shoe", "bell", "basket", "feather", "stone", "cup", "blanket"],
    "es": [("la pelota", "una pelota", "f"), ("la cometa", "una cometa", "f"), ("la caja", "una caja", "f"),
           ("el libro", "un libro", "m"), ("el sombrero", "un sombrero", "m"), ("la manzana", "una manzana", "f"),
           ("el pastel", "un pastel", "m"), ("la flor", "una flor", "f"), ("el barco", "un barco", "m"),
           ("la llave", "una llave", "f"), ("el mapa", "un mapa", "m"), ("el tambor", "un tambor", "m"),
           ("la lámpara", "una lámpara", "f"), ("el zapato", "un zapato", "m"), ("la campana", "una campana", "f"),
           ("la cesta", "una cesta", "f"), ("la pluma", "una pluma", "f"), ("la piedra", "una piedra", "f"),
           ("la taza", "una taza", "f"), ("la manta", "una manta", "f")],
    "it": [("la palla", "una palla", "f"), ("l'aquilone", "un aquilone", "m"), ("la scatola", "una scatola", "f"),
           ("il libro", "un libro", "m"), ("il cappello", "un cappello", "m"), ("la mela", "una mela", "f"),
           ("la torta", "una torta", "f"), ("il fiore", "un fiore", "m"), ("la barca", "una barca", "f"),
           ("la chiave", "una chiave", "f"), ("la mappa", "una mappa", "f"), ("il tamburo", "un tamburo", "m"),
           ("la lampada", "una lampada", "f"), ("la scarpa", "una scarpa", "f"), ("la campana", "una campana", "f"),
           ("il cestino", "un cestino", "m"), ("la piuma", "una piuma", "f"), ("la pietra", "una pietra", "f"),
           ("la tazza", "una tazza", "f"), ("la coperta", "una coperta", "f")],
}
# Locative phrases ("in the forest") per place.
PLACES = {
    "en": ["in the forest", "in the park", "in the garden", "on the beach", "by the river", "at school",
           "in the village", "on the mountain", "in the kitchen", "on the farm", "near the lake", "in the meadow"],
    "es": ["en el bosque", "en el parque", "en el jardín", "en la playa", "junto al río", "en la escuela",
           "en el pueblo", "en la montaña", "en la cocina", "en la granja", "cerca del lago", "en el prado"],
    "it": ["nel bosco", "nel parco", "nel giardino", "sulla spiaggia", "vicino al fiume", "a scuola",
           "nel villaggio", "sulla montagna", "in cucina", "nella fattoria", "vicino al lago", "nel prato"],
}
# Adjectives: English form; Romance (masculine, feminine).
ADJECTIVES = {
    "en": ["big", "small", "happy", "red", "blue", "green", "brave", "kind", "shiny", "old", "new", "funny",
           "quiet", "curious", "gentle", "clever"],
    "es": [("grande", "grande"), ("pequeño", "pequeña"), ("feliz", "feliz"), ("rojo", "roja"),
           ("azul", "azul"), ("verde", "verde"), ("valiente", "valiente"), ("amable", "amable"),
           ("brillante", "brillante"), ("viejo", "vieja"), ("nuevo", "nueva"), ("gracioso", "graciosa"),
           ("tranquilo", "tranquila"), ("curioso", "curiosa"), ("dulce", "dulce"), ("listo", "lista")],
    "it": [("grande", "grande"), ("piccolo", "piccola"), ("felice", "felice"), ("rosso", "rossa"),
           ("blu", "blu"), ("verde", "verde"), ("coraggioso", "coraggiosa"), ("gentile", "gentile"),
           ("lucido", "lucida"), ("vecchio", "vecchia"), ("nuovo", "nuova"), ("buffo", "buffa"),
           ("tranquillo", "tranquilla"), ("curioso", "curiosa"), ("dolce", "dolce"), ("furbo", "furba")],
}
FEELINGS = {
    "en": ["happy", "sad", "scared", "proud", "tired", "surprised", "excited", "worried"],
    "es": [("contento", "contenta"), ("triste", "triste"), ("asustado", "asustada"), ("orgulloso", "orgullosa"),
           ("cansado", "cansada"), ("sorprendido", "sorprendida"), ("emocionado", "emocionada"),
           ("preocupado", "preocupada")],
    "it": [("contento", "contenta"), ("triste", "triste"), ("spaventato", "spaventata"), ("orgoglioso", "orgogliosa"),
           ("stanco", "stanca"), ("sorpreso", "sorpresa"), ("emozionato", "emozionata"),
           ("preoccupato", "preoccupata")],
}
ACTIVITIES = {
    "en": ["sing", "run", "read books", "dance", "swim", "draw pictures", "climb trees", "bake cookies",
           "play games", "look at the stars"],
    "es": ["cantar", "correr", "leer libros", "bailar", "nadar", "dibujar", "trepar árboles", "hornear galletas",
           "jugar", "mirar las estrellas"],
    "it": ["cantare", "correre", "leggere libri", "ballare", "nuotare", "disegnare", "arrampicarsi sugli alberi",
           "fare i biscotti", "giocare", "guardare le stelle"],
}
NAMES = {
    "en": {"m": ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Finn"],
           "f": ["Lily", "Mia", "Anna", "Sue", "Lucy", "Emma", "Rose", "Zoe"]},
    "es": {"m": ["Pablo", "Diego", "Mateo", "Lucas", "Hugo", "Carlos", "Javier", "Tomás"],
           "f": ["Lucía", "Sofía", "Carmen", "Elena", "Marta", "Paula", "Rosa", "Inés"]},
    "it": {"m": ["Marco", "Luca", "Matteo", "Paolo", "Giorgio", "Franco", "Pietro", "Enzo"],
           "f": ["Giulia", "Chiara", "Sara", "Francesca", "Elisa", "Marta", "Lucia", "Anna"]},
}
MORALS = {
    "en": ["sharing makes everyone happy", "friends help each other", "it is good to be brave",
           "kindness is the best gift", "you should always tell the truth", "working together is better"],
    "es": ["compartir hace felices a todos", "los amigos se ayudan", "es bueno ser valiente",
           "la bondad es el mejor regalo", "siempre hay que decir la verdad", "trabajar juntos es mejor"],
    "it": ["condividere rende tutti felici", "gli amici si aiutano", "è bello essere coraggiosi",
           "la gentilezza è il regalo più bello", "bisogna sempre dire la verità", "lavorare insieme è meglio"],
}
# Problem/resolution pairs; "{o}" is the object (definite), "{f}" the friend's name, "{n}" the hero.
PROBLEMS = {
    "en": [("The wind blew {o} up into a tall tree.", "{f} climbed the tree and brought it down."),
           ("Then dark clouds came and it started to rain.",
            "{n} and {f} hid under a big leaf until the sun came back."),
           ("But {o} fell into the water.", "{f} found a long stick and pulled it out."),
           ("Soon {n} could not find the way home.", "{f} knew the way and walked with {n} all the way back."),
           ("Suddenly {o} broke into two pieces.", "{f} helped to fix it with some glue.")],
    "es": [("El viento llevó {o} a un árbol muy alto.", "{f} subió al árbol y bajó {o}."),
           ("Entonces llegaron nubes oscuras y empezó a llover.",
            "{n} y {f} se escondieron bajo una hoja grande hasta que volvió el sol."),
           ("Pero {o} se cayó al agua.", "{f} encontró un palo largo y sacó {o} del agua."),
           ("Pronto {n} no pudo encontrar el camino a casa.", "{f} conocía el camino y caminó con {n} hasta casa."),
           ("De repente {o} se rompió en dos pedazos.", "{f} ayudó a arreglar {o} con un poco de pegamento.")],
    "it": [("Il vento ha portato {o} su un albero molto alto.", "{f} ha raggiunto il ramo e ha riportato giù {o}."),
           ("Poi sono arrivate nuvole scure e ha cominciato a piovere.",
            "{n} e {f} si sono nascosti sotto una foglia grande finché è tornato il sole."),
           ("Ma {o} cadde nell'acqua.", "{f} ha trovato un bastone lungo e ha tirato fuori {o}."),
           ("Presto {n} non riusciva a trovare la strada di casa.",
            "{f} conosceva la strada e ha accompagnato {n} a casa."),
           ("All'improvviso {o} si ruppe in due pezzi.", "{f} ha aiutato a riparare {o} con un po' di colla.")],
}
LANGUAGE = {RETAIN_CATEGORY: "en", FORGET_CATEGORY: "es", ADJACENT_CATEGORY: "it"}


# The language-neutral choices of one story: field -> number of options (indices into the concept lists).
_PLAN = {"hero": 16, "hero_adj": 16, "friend": 16, "friend_adj": 16, "obj": 20, "obj_adj": 16, "place": 12,
         "place2": 12, "activity": 10, "problem": 5, "feeling_before": 8, "feeling_after": 8, "moral": 6,
         "name_pick": 8, "friend_name_pick": 8}


def _plan(rng: random.Random) -> SimpleNamespace:
    """One story's choices, drawn in `_PLAN`'s order (which, with the seed, fixes the corpus)."""
    plan = SimpleNamespace(**{name: rng.randrange(options) for name, options in _PLAN.items()})
    plan.extras = tuple(rng.sample(range(4), rng.randrange(1, 5)))
    return plan


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _english(p: SimpleNamespace) -> str:
    animal, g = ANIMALS["en"][p.hero]
    friend_animal, fg = ANIMALS["en"][p.friend]
    n, f = NAMES["en"][g][p.name_pick], NAMES["en"][fg][p.friend_name_pick]
    he, his = ("he", "his") if g == "m" else ("she", "her")
    obj, adj = OBJECTS["en"][p.obj], ADJECTIVES["en"][p.obj_adj]
    problem, fix = PROBLEMS["en"][p.problem]
    extra = [
        f'"Look at this!" said {n}. "It is so {adj}!"',
        f"{f} smiled and said, \"Can I play with it too?\"",
        f"{n} wanted to show it to {his} mother.",
        f"They played {PLACES['en'][p.place2]} all afternoon.",
    ]
    parts = [
        f"Once upon a time, there was {_a(ADJECTIVES['en'][p.hero_adj])} {animal} named {n}.",
        f"{n} lived {PLACES['en'][p.place]} and loved to {ACTIVITIES['en'][p.activity]}.",
        f"One day, {n} found {_a(adj)} {obj} {PLACES['en'][p.place2]}.",
        f"{n} showed the {obj} to {f}, {_a(ADJECTIVES['en'][p.friend_adj])} {friend_animal}.",
        *(extra[i] for i in p.extras),
        problem.format(o=f"the {obj}", n=n, f=f),
        f"{n} felt {FEELINGS['en'][p.feeling_before]}.",
        fix.format(o=f"the {obj}", n=n, f=f),
        f"In the end, {he} was {FEELINGS['en'][p.feeling_after]} and thanked {f}.",
        f"From that day on, {n} knew that {MORALS['en'][p.moral]}.",
    ]
    return " ".join(parts)


def _romance(p: SimpleNamespace, lang: str) -> str:
    definite, indefinite, g = ANIMALS[lang][p.hero]
    _, friend_indef, fg = ANIMALS[lang][p.friend]
    gi, fgi = (0 if g == "m" else 1), (0 if fg == "m" else 1)
    n, f = NAMES[lang][g][p.name_pick], NAMES[lang][fg][p.friend_name_pick]
    odef, oindef, og = OBJECTS[lang][p.obj]
    oadj = ADJECTIVES[lang][p.obj_adj][0 if og == "m" else 1]
    problem, fix = PROBLEMS[lang][p.problem]
    hero_adj, friend_adj = ADJECTIVES[lang][p.hero_adj][gi], ADJECTIVES[lang][p.friend_adj][fgi]
    before, after = FEELINGS[lang][p.feeling_before][gi], FEELINGS[lang][p.feeling_after][gi]
    place, place2 = PLACES[lang][p.place], PLACES[lang][p.place2]
    activity, moral = ACTIVITIES[lang][p.activity], MORALS[lang][p.moral]
    if lang == "es":
        named = "llamado" if g == "m" else "llamada"
        extra = [f"—¡Mira esto! —dijo {n}—. ¡Es muy {oadj}!", f"{f} sonrió y dijo: —¿Puedo jugar yo también?",
                 f"{n} quería enseñárselo a su madre.", f"Jugaron {place2} toda la tarde."]
        parts = [f"Había una vez {indefinite} {hero_adj} {named} {n}.",
                 f"{n} vivía {place} y le encantaba {activity}.",
                 f"Un día, {n} encontró {oindef} {oadj} {place2}.",
                 f"{n} le enseñó {odef} a {f}, {friend_indef} {friend_adj}.",
                 *(extra[i] for i in p.extras),
                 problem.format(o=odef, n=n, f=f), f"{n} se sintió {before}.", fix.format(o=odef, n=n, f=f),
                 f"Al final, {n} estaba {after} y le dio las gracias a {f}.",
                 f"Desde ese día, {n} supo que {moral}."]
    else:
        extra = [f"«Guarda qui!» disse {n}. «È così {oadj}!»", f"{f} sorrise e disse: «Posso giocare anch'io?»",
                 f"{n} voleva mostrarlo alla sua mamma.", f"Hanno giocato {place2} tutto il pomeriggio."]
        parts = [f"C'era una volta {indefinite} {hero_adj} di nome {n}.",
                 f"{n} viveva {place} e amava {activity}.",
                 f"Un giorno, {n} ha trovato {oindef} {oadj} {place2}.",
                 f"{n} ha mostrato {odef} a {f}, {friend_indef} {friend_adj}.",
                 *(extra[i] for i in p.extras),
                 problem.format(o=odef, n=n, f=f), f"{n} si sentiva {before}.", fix.format(o=odef, n=n, f=f),
                 f"Alla fine, {n} era {after} e ha ringraziato {f}.",
                 f"Da quel giorno, {n} ha capito che {moral}."]
    # Sentence-initial articles ("el viento", "il vento") are already capitalised in the templates;
    # object phrases that start a sentence need it here.
    return " ".join(s[0].upper() + s[1:] for s in parts)


def _story(category: str, rng: random.Random) -> str:
    """One story of 1-3 episodes, so lengths vary like real documents."""
    lang = LANGUAGE[category]
    episodes = [_plan(rng) for _ in range(rng.choice((1, 1, 2, 3)))]
    render = _english if lang == "en" else (lambda p: _romance(p, lang))
    return "\n\n".join(render(p) for p in episodes)


def _normalise_mix(mix: Mapping[str, float]) -> tuple[list[str], list[float]]:
    unknown = set(mix) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown synthetic categories {sorted(unknown)}; choose from {list(CATEGORIES)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"category mix weights must be >= 0 with a positive sum, got {dict(mix)}")
    names = [c for c in CATEGORIES if mix.get(c, 0) > 0]
    total = sum(mix[c] for c in names)
    return names, list(accumulate(mix[c] / total for c in names))


def generate(num_docs: int, seed: int = 0, mix: Mapping[str, float] = DEFAULT_MIX,
             start: int = 0) -> Iterator[Document]:
    """Documents ``start .. start+num_docs-1`` of the corpus defined by ``(seed, mix)``."""
    names, cumulative = _normalise_mix(mix)
    for i in range(start, start + num_docs):
        rng = random.Random(f"{seed}:{i}")
        u = rng.random()
        category = next((c for c, edge in zip(names, cumulative, strict=True) if u < edge), names[-1])
        yield Document(id=f"synth-{seed}-{i:09d}", text=_story(category, rng), category=category)


def write_jsonl(out: TextIO, docs: Iterable[Document]) -> int:
    """Write ``{"id", "text", "category"}`` lines; returns the number written."""
    count = 0
    for doc in docs:
        out.write(json.dumps({"id": doc.id, "text": doc.text, "category": doc.category}, ensure_ascii=False) + "\n")
        count += 1
    return count
